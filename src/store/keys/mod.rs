//! Prekeys: identity key, signed prekey, PQ last-resort key and the one-time
//! EC and PQ prekeys.
//!
//! One-time keys are handed out at most once, ever: [`take_bundle`] deletes
//! each key in the same statement that reads it (`DELETE … RETURNING`), inside
//! one transaction. On PostgreSQL the row is chosen `FOR UPDATE SKIP LOCKED`,
//! so several server processes sharing one database never hand out the same
//! key and never wait on each other; SQLite serialises writers by itself.

mod take;

use diesel::prelude::*;
use diesel::upsert::excluded;

pub use take::take_bundle;

use super::schema::{
    accounts, one_time_pre_keys, pq_last_resort_keys, pq_one_time_pre_keys, signed_pre_keys,
};
use super::{with_conn, Conn, StoreError};
use crate::domain::address::Address;
use crate::domain::prekeys::{KeySet, UploadRefusal};

enum TxError {
    Store(StoreError),
    Refused(UploadRefusal),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Store(StoreError::Query(e))
    }
}

/// One-time EC and PQ keys stored for a device, on either backend's
/// connection (inside or outside a transaction); `?`s a Diesel error.
macro_rules! count_keys {
    ($c:expr, $account:expr, $device:expr) => {{
        let ec: i64 = one_time_pre_keys::table
            .filter(one_time_pre_keys::account.eq($account))
            .filter(one_time_pre_keys::device_id.eq($device))
            .count()
            .get_result($c)?;
        let pq: i64 = pq_one_time_pre_keys::table
            .filter(pq_one_time_pre_keys::account.eq($account))
            .filter(pq_one_time_pre_keys::device_id.eq($device))
            .count()
            .get_result($c)?;
        (ec, pq)
    }};
}

/// Replaces a device's one key of a signed, one-per-device kind: the signed
/// prekey and the PQ last-resort key have the same columns.
macro_rules! upsert_signed {
    ($c:expr, $table:ident, $account:expr, $device:expr, $key:expr) => {
        diesel::insert_into($table::table)
            .values((
                $table::account.eq($account),
                $table::device_id.eq($device),
                $table::key_id.eq(i64::from($key.key_id)),
                $table::public_key.eq(&$key.public_key),
                $table::signature.eq(&$key.signature),
            ))
            .on_conflict(($table::account, $table::device_id))
            .do_update()
            .set((
                $table::key_id.eq(i64::from($key.key_id)),
                $table::public_key.eq(&$key.public_key),
                $table::signature.eq(&$key.signature),
            ))
            .execute($c)
    };
}

/// Stores an upload in one transaction: all of it, or (on refusal or error) none.
pub fn store_keys(
    conn: &mut Conn,
    addr: Address,
    keys: &KeySet,
    max_one_time_keys: u64,
) -> Result<Result<(), UploadRefusal>, StoreError> {
    let account = addr.account.as_db();
    let device = addr.device.as_db();
    let result = with_conn!(conn, c => c.transaction::<_, TxError, _>(|c| {
        let current: Option<Option<Vec<u8>>> = accounts::table
            .filter(accounts::uuid.eq(&account))
            .select(accounts::identity_key)
            .first(c)
            .optional()?;
        match current {
            // The authenticated device's account vanished mid-request.
            None => return Err(TxError::Refused(UploadRefusal::IdentityMismatch)),
            Some(Some(stored)) if stored != keys.identity_key => {
                return Err(TxError::Refused(UploadRefusal::IdentityMismatch))
            }
            Some(Some(_)) => {}
            Some(None) if addr.device.is_primary() => {
                diesel::update(accounts::table)
                    .filter(accounts::uuid.eq(&account))
                    .set(accounts::identity_key.eq(&keys.identity_key))
                    .execute(c)?;
            }
            Some(None) => return Err(TxError::Refused(UploadRefusal::IdentityMismatch)),
        }
        if keys.signed_pre_key.is_none() {
            let has_one: i64 = signed_pre_keys::table
                .filter(signed_pre_keys::account.eq(&account))
                .filter(signed_pre_keys::device_id.eq(device))
                .count()
                .get_result(c)?;
            if has_one == 0 {
                return Err(TxError::Refused(UploadRefusal::MissingSignedPreKey));
            }
        }
        if let Some(k) = &keys.signed_pre_key {
            upsert_signed!(c, signed_pre_keys, &account, device, k)?;
        }
        if let Some(k) = &keys.pq_last_resort {
            upsert_signed!(c, pq_last_resort_keys, &account, device, k)?;
        }
        // A re-uploaded key id replaces the old key: the client may have
        // discarded the old private key.
        for k in &keys.one_time {
            diesel::insert_into(one_time_pre_keys::table)
                .values((
                    one_time_pre_keys::account.eq(&account),
                    one_time_pre_keys::device_id.eq(device),
                    one_time_pre_keys::key_id.eq(i64::from(k.key_id)),
                    one_time_pre_keys::public_key.eq(&k.public_key),
                ))
                .on_conflict((
                    one_time_pre_keys::account,
                    one_time_pre_keys::device_id,
                    one_time_pre_keys::key_id,
                ))
                .do_update()
                .set(one_time_pre_keys::public_key.eq(excluded(one_time_pre_keys::public_key)))
                .execute(c)?;
        }
        for k in &keys.pq_one_time {
            diesel::insert_into(pq_one_time_pre_keys::table)
                .values((
                    pq_one_time_pre_keys::account.eq(&account),
                    pq_one_time_pre_keys::device_id.eq(device),
                    pq_one_time_pre_keys::key_id.eq(i64::from(k.key_id)),
                    pq_one_time_pre_keys::public_key.eq(&k.public_key),
                    pq_one_time_pre_keys::signature.eq(&k.signature),
                ))
                .on_conflict((
                    pq_one_time_pre_keys::account,
                    pq_one_time_pre_keys::device_id,
                    pq_one_time_pre_keys::key_id,
                ))
                .do_update()
                .set((
                    pq_one_time_pre_keys::public_key.eq(excluded(pq_one_time_pre_keys::public_key)),
                    pq_one_time_pre_keys::signature.eq(excluded(pq_one_time_pre_keys::signature)),
                ))
                .execute(c)?;
        }
        if !keys.one_time.is_empty() || !keys.pq_one_time.is_empty() {
            let (ec, pq) = count_keys!(c, &account, device);
            let max = i64::try_from(max_one_time_keys).unwrap_or(i64::MAX);
            if ec > max || pq > max {
                return Err(TxError::Refused(UploadRefusal::TooManyKeys));
            }
        }
        Ok(())
    }));
    match result {
        Ok(()) => Ok(Ok(())),
        Err(TxError::Refused(r)) => Ok(Err(r)),
        Err(TxError::Store(e)) => Err(e),
    }
}

/// One-time EC and PQ keys left for a device: `(count, pqCount)`.
pub fn count_one_time_keys(conn: &mut Conn, addr: Address) -> Result<(i64, i64), StoreError> {
    let account = addr.account.as_db();
    let device = addr.device.as_db();
    Ok(with_conn!(conn, c => {
        let counts: Result<(i64, i64), diesel::result::Error> =
            (|| Ok(count_keys!(c, &account, device)))();
        counts
    })?)
}
