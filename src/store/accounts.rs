//! Accounts, devices and provisioning codes.

use diesel::prelude::*;

use super::schema::{accounts, devices, mailbox, mailbox_counts, provisioning_codes};
use super::{with_conn, write_batch, Conn, StoreError};
use crate::domain::access::AccessPolicy;
use crate::domain::address::{AccountId, Address, DeviceId, PRIMARY_DEVICE};

/// What is stored of a device secret: a salt and SHA-256(salt || secret).
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub salt: Vec<u8>,
    pub hash: Vec<u8>,
    pub last_seen_at: i64,
}

/// A device as `GET /v1/devices` lists it.
#[derive(Debug, Clone, Queryable)]
pub struct DeviceRow {
    pub device_id: i64,
    pub registration_id: i32,
    pub created_at: i64,
    pub last_seen_at: i64,
}

/// A new device's credentials, already hashed.
pub struct NewDevice<'a> {
    pub registration_id: i32,
    pub salt: &'a [u8],
    pub hash: &'a [u8],
    pub now: i64,
}

/// Inserts a device row; a macro rather than a function so one body serves
/// both concrete connection types inside their transactions.
macro_rules! insert_device_row {
    ($c:expr, $account:expr, $device_id:expr, $device:expr) => {
        diesel::insert_into(devices::table)
            .values((
                devices::account.eq($account),
                devices::device_id.eq($device_id.as_db()),
                devices::registration_id.eq($device.registration_id),
                devices::secret_salt.eq($device.salt),
                devices::secret_hash.eq($device.hash),
                devices::created_at.eq($device.now),
                devices::last_seen_at.eq($device.now),
            ))
            .execute($c)
    };
}

/// Creates an account with its primary device, in one transaction.
pub fn insert_account(
    conn: &mut Conn,
    account: AccountId,
    device: &NewDevice<'_>,
) -> Result<(), StoreError> {
    let id = account.as_db();
    with_conn!(conn, c => c.transaction::<_, StoreError, _>(|c| {
        diesel::insert_into(accounts::table)
            .values((
                accounts::uuid.eq(&id),
                accounts::next_device_id.eq(PRIMARY_DEVICE.as_db() + 1),
                accounts::created_at.eq(device.now),
            ))
            .execute(c)?;
        insert_device_row!(c, &id, PRIMARY_DEVICE, device)?;
        Ok(())
    }))
}

/// The stored secret of one device, if the device exists.
pub fn find_secret(conn: &mut Conn, addr: Address) -> Result<Option<StoredSecret>, StoreError> {
    let account = addr.account.as_db();
    let row: Option<(Vec<u8>, Vec<u8>, i64)> = with_conn!(conn, c => devices::table
        .filter(devices::account.eq(&account))
        .filter(devices::device_id.eq(addr.device.as_db()))
        .select((devices::secret_salt, devices::secret_hash, devices::last_seen_at))
        .first(c)
        .optional())?;
    Ok(row.map(|(salt, hash, last_seen_at)| StoredSecret {
        salt,
        hash,
        last_seen_at,
    }))
}

/// Records that a device was seen (authenticated) at `now`.
pub fn touch_device(conn: &mut Conn, addr: Address, now: i64) -> Result<(), StoreError> {
    let account = addr.account.as_db();
    with_conn!(conn, c => diesel::update(devices::table)
        .filter(devices::account.eq(&account))
        .filter(devices::device_id.eq(addr.device.as_db()))
        .set(devices::last_seen_at.eq(now))
        .execute(c))?;
    Ok(())
}

pub fn account_exists(conn: &mut Conn, account: AccountId) -> Result<bool, StoreError> {
    let id = account.as_db();
    let n: i64 = with_conn!(conn, c => accounts::table
        .filter(accounts::uuid.eq(&id))
        .count()
        .get_result(c))?;
    Ok(n > 0)
}

/// The devices of an account, by id. Empty when the account does not exist.
pub fn list_devices(conn: &mut Conn, account: AccountId) -> Result<Vec<DeviceRow>, StoreError> {
    let id = account.as_db();
    let rows = with_conn!(conn, c => devices::table
        .filter(devices::account.eq(&id))
        .order(devices::device_id.asc())
        .select((
            devices::device_id,
            devices::registration_id,
            devices::created_at,
            devices::last_seen_at,
        ))
        .load(c))?;
    Ok(rows)
}

/// Removes one device with its keys (by cascade) and its mailbox, in one
/// transaction. Returns false when there was no such device.
pub fn delete_device(conn: &mut Conn, addr: Address) -> Result<bool, StoreError> {
    let account = addr.account.as_db();
    let device = addr.device.as_db();
    with_conn!(conn, c => c.transaction::<_, StoreError, _>(|c| {
        diesel::delete(mailbox::table)
            .filter(mailbox::account.eq(&account))
            .filter(mailbox::device_id.eq(device))
            .execute(c)?;
        diesel::delete(mailbox_counts::table)
            .filter(mailbox_counts::account.eq(&account))
            .filter(mailbox_counts::device_id.eq(device))
            .execute(c)?;
        let n = diesel::delete(devices::table)
            .filter(devices::account.eq(&account))
            .filter(devices::device_id.eq(device))
            .execute(c)?;
        Ok(n > 0)
    }))
}

/// Removes an account, its devices, keys, codes (by cascade) and mailboxes.
pub fn delete_account(conn: &mut Conn, account: AccountId) -> Result<bool, StoreError> {
    let id = account.as_db();
    with_conn!(conn, c => c.transaction::<_, StoreError, _>(|c| {
        diesel::delete(mailbox::table)
            .filter(mailbox::account.eq(&id))
            .execute(c)?;
        diesel::delete(mailbox_counts::table)
            .filter(mailbox_counts::account.eq(&id))
            .execute(c)?;
        let n = diesel::delete(accounts::table)
            .filter(accounts::uuid.eq(&id))
            .execute(c)?;
        Ok(n > 0)
    }))
}

/// Stores a provisioning code (by its hash) for `account`.
pub fn insert_provisioning_code(
    conn: &mut Conn,
    code_hash: &str,
    account: AccountId,
    expires_at: i64,
) -> Result<(), StoreError> {
    let id = account.as_db();
    with_conn!(conn, c => diesel::insert_into(provisioning_codes::table)
        .values((
            provisioning_codes::code_hash.eq(code_hash),
            provisioning_codes::account.eq(&id),
            provisioning_codes::expires_at.eq(expires_at),
        ))
        .execute(c))?;
    Ok(())
}

/// Why a link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// Unknown, already used or expired code.
    InvalidCode,
    /// The account already has `max_devices` devices.
    TooManyDevices,
}

/// Consumes a provisioning code and adds a device to its account, in one
/// transaction: the code is deleted as it is read, so it links at most one
/// device even when two requests race (the second finds nothing to delete).
///
/// Counting the devices and inserting one is atomic too, so links racing
/// with distinct codes never take an account past `max_devices`: on SQLite
/// the transaction is `BEGIN IMMEDIATE` ([`write_batch`]: it holds the
/// database's write lock from the start), and on PostgreSQL the account row
/// is locked `FOR UPDATE` before the count, so a concurrent link of the same
/// account waits for this one to commit and then counts its device. A
/// refused link still consumes its code.
pub fn link_device(
    conn: &mut Conn,
    code_hash: &str,
    device: &NewDevice<'_>,
    max_devices: u32,
) -> Result<Result<Address, LinkRefusal>, StoreError> {
    write_batch(conn, |conn| {
        let taken: Option<(String, i64)> = with_conn!(conn, c => diesel::delete(provisioning_codes::table)
            .filter(provisioning_codes::code_hash.eq(code_hash))
            .returning((provisioning_codes::account, provisioning_codes::expires_at))
            .get_result(c)
            .optional())?;
        let account = match taken {
            Some((account, expires_at)) if expires_at > device.now => account,
            _ => return Ok(Err(LinkRefusal::InvalidCode)),
        };
        if let Conn::Pg(c) = conn {
            // Each statement of a READ COMMITTED transaction sees what was
            // committed before it started: the count below, run once the lock
            // is ours, sees every device a racing link committed.
            accounts::table
                .filter(accounts::uuid.eq(&account))
                .select(accounts::uuid)
                .for_update()
                .first::<String>(c)?;
        }
        with_conn!(conn, c => {
            let count: i64 = devices::table
                .filter(devices::account.eq(&account))
                .count()
                .get_result(c)?;
            if count >= i64::from(max_devices) {
                return Ok(Err(LinkRefusal::TooManyDevices));
            }
            // Read-and-bump in one UPDATE … RETURNING so two links never share an id.
            let next: i64 = diesel::update(accounts::table)
                .filter(accounts::uuid.eq(&account))
                .set(accounts::next_device_id.eq(accounts::next_device_id + 1))
                .returning(accounts::next_device_id)
                .get_result(c)?;
            let device_id = DeviceId(u32::try_from(next - 1).map_err(|_| {
                StoreError::Migration("device ids exhausted for account".into())
            })?);
            insert_device_row!(c, &account, device_id, device)?;
            let account: AccountId = account
                .parse()
                .map_err(|_| StoreError::Migration("corrupt account id".into()))?;
            Ok(Ok(Address::new(account, device_id)))
        })
    })
}

/// Deletes expired provisioning codes; returns how many.
pub fn sweep_provisioning_codes(conn: &mut Conn, now: i64) -> Result<usize, StoreError> {
    let n = with_conn!(conn, c => diesel::delete(provisioning_codes::table)
        .filter(provisioning_codes::expires_at.le(now))
        .execute(c))?;
    Ok(n)
}

/// An account's unidentified-access policy; `None` when there is no such
/// account.
pub fn access_policy(
    conn: &mut Conn,
    account: AccountId,
) -> Result<Option<AccessPolicy>, StoreError> {
    let id = account.as_db();
    let row: Option<(Option<Vec<u8>>, bool)> = with_conn!(conn, c => accounts::table
        .filter(accounts::uuid.eq(&id))
        .select((
            accounts::unidentified_access_key,
            accounts::unrestricted_unidentified_access,
        ))
        .first(c)
        .optional())?;
    Ok(row.map(|(key, unrestricted)| AccessPolicy {
        // Only 16-byte keys are ever written; anything else opens nothing.
        key: key.and_then(|k| k.try_into().ok()),
        unrestricted,
    }))
}

/// Sets an account's unidentified-access policy; `false` when there is no
/// such account.
pub fn set_access_policy(
    conn: &mut Conn,
    account: AccountId,
    policy: &AccessPolicy,
) -> Result<bool, StoreError> {
    let id = account.as_db();
    let key = policy.key.map(|k| k.to_vec());
    let n = with_conn!(conn, c => diesel::update(accounts::table)
        .filter(accounts::uuid.eq(&id))
        .set((
            accounts::unidentified_access_key.eq(&key),
            accounts::unrestricted_unidentified_access.eq(policy.unrestricted),
        ))
        .execute(c))?;
    Ok(n > 0)
}

/// The account's identity key, if it has uploaded one.
pub fn identity_key(conn: &mut Conn, account: AccountId) -> Result<Option<Vec<u8>>, StoreError> {
    let id = account.as_db();
    let key: Option<Option<Vec<u8>>> = with_conn!(conn, c => accounts::table
        .filter(accounts::uuid.eq(&id))
        .select(accounts::identity_key)
        .first(c)
        .optional())?;
    Ok(key.flatten())
}
