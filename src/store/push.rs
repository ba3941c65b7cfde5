//! Web Push state: the server's VAPID key and each device's subscription.

use diesel::prelude::*;

use super::schema::{push_subscriptions, vapid_key};
use super::{with_conn, Conn, StoreError};
use crate::domain::address::Address;

/// A stored push subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    pub endpoint: String,
    pub p256dh: Vec<u8>,
    pub auth: Vec<u8>,
}

/// The one row of `vapid_key`.
const VAPID_ROW: i32 = 1;

/// The server's VAPID secret key: `candidate` if none was stored yet,
/// else the stored one. Insert-if-absent then read back, so when several
/// nodes of a cluster start at once they all end up with the same key.
pub fn vapid_key(conn: &mut Conn, candidate: &[u8], now: i64) -> Result<Vec<u8>, StoreError> {
    with_conn!(conn, c => {
        diesel::insert_into(vapid_key::table)
            .values((
                vapid_key::id.eq(VAPID_ROW),
                vapid_key::private_key.eq(candidate),
                vapid_key::created_at.eq(now),
            ))
            .on_conflict_do_nothing()
            .execute(c)?;
        Ok(vapid_key::table
            .filter(vapid_key::id.eq(VAPID_ROW))
            .select(vapid_key::private_key)
            .first(c)?)
    })
}

/// Sets `device`'s subscription, replacing any earlier one. `false` if the
/// device does not exist (any more).
pub fn put_subscription(
    conn: &mut Conn,
    device: Address,
    sub: &StoredSubscription,
    now: i64,
) -> Result<bool, StoreError> {
    let account = device.account.as_db();
    let device_id = device.device.as_db();
    let put = with_conn!(conn, c => diesel::insert_into(push_subscriptions::table)
        .values((
            push_subscriptions::account.eq(&account),
            push_subscriptions::device_id.eq(device_id),
            push_subscriptions::endpoint.eq(&sub.endpoint),
            push_subscriptions::p256dh.eq(&sub.p256dh),
            push_subscriptions::auth.eq(&sub.auth),
            push_subscriptions::created_at.eq(now),
        ))
        .on_conflict((push_subscriptions::account, push_subscriptions::device_id))
        .do_update()
        .set((
            push_subscriptions::endpoint.eq(&sub.endpoint),
            push_subscriptions::p256dh.eq(&sub.p256dh),
            push_subscriptions::auth.eq(&sub.auth),
            push_subscriptions::created_at.eq(now),
        ))
        .execute(c));
    match put {
        Ok(_) => Ok(true),
        // The device was deleted between authentication and now.
        Err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::ForeignKeyViolation,
            _,
        )) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `device`'s subscription, if it has one.
pub fn find_subscription(
    conn: &mut Conn,
    device: Address,
) -> Result<Option<StoredSubscription>, StoreError> {
    let account = device.account.as_db();
    let row: Option<(String, Vec<u8>, Vec<u8>)> = with_conn!(conn, c => push_subscriptions::table
        .filter(push_subscriptions::account.eq(&account))
        .filter(push_subscriptions::device_id.eq(device.device.as_db()))
        .select((
            push_subscriptions::endpoint,
            push_subscriptions::p256dh,
            push_subscriptions::auth,
        ))
        .first(c)
        .optional())?;
    Ok(row.map(|(endpoint, p256dh, auth)| StoredSubscription {
        endpoint,
        p256dh,
        auth,
    }))
}

/// Deletes `device`'s subscription; with `endpoint`, only if it is still
/// that one (a push service said it is gone, while the device may have
/// subscribed anew meanwhile). Whether a row was deleted.
pub fn delete_subscription(
    conn: &mut Conn,
    device: Address,
    endpoint: Option<&str>,
) -> Result<bool, StoreError> {
    let account = device.account.as_db();
    let device_id = device.device.as_db();
    let n = with_conn!(conn, c => {
        let query = diesel::delete(push_subscriptions::table)
            .filter(push_subscriptions::account.eq(&account))
            .filter(push_subscriptions::device_id.eq(device_id));
        match endpoint {
            Some(endpoint) => query
                .filter(push_subscriptions::endpoint.eq(endpoint))
                .execute(c),
            None => query.execute(c),
        }
    })?;
    Ok(n > 0)
}
