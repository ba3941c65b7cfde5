//! `KeysActor`: owns every prekey read and write, on one `SyncArbiter`
//! thread, so bundle fetches are serialised in this process and never
//! contend with each other for the same one-time key. The at-most-once
//! guarantee itself is the store's (`store::keys::take_bundle` deletes each
//! key as it reads it), so it holds across processes too.

use actix::{Actor, Handler, Message, SyncContext};

use crate::domain::address::{AccountId, Address, DeviceId};
use crate::store::keys::{Bundle, KeySet, UploadRefusal};
use crate::store::{self, Pool, StoreError};

pub struct KeysActor {
    pool: Pool,
    max_one_time_keys: u64,
}

impl KeysActor {
    pub fn new(pool: Pool, max_one_time_keys: u64) -> Self {
        KeysActor {
            pool,
            max_one_time_keys,
        }
    }
}

impl Actor for KeysActor {
    type Context = SyncContext<Self>;
}

/// From the keys service: store a verified upload for `address`.
#[derive(Message)]
#[rtype(result = "Result<Result<(), UploadRefusal>, StoreError>")]
pub struct StoreKeys {
    pub address: Address,
    pub keys: KeySet,
}

/// From the keys service: one-time keys left, `(count, pqCount)`.
#[derive(Message)]
#[rtype(result = "Result<(i64, i64), StoreError>")]
pub struct CountKeys(pub Address);

/// From the keys service: build (and consume one-time keys for) a bundle.
#[derive(Message)]
#[rtype(result = "Result<Option<Bundle>, StoreError>")]
pub struct TakeBundle {
    pub account: AccountId,
    /// `None`: every device of the account.
    pub device: Option<DeviceId>,
}

impl Handler<StoreKeys> for KeysActor {
    type Result = Result<Result<(), UploadRefusal>, StoreError>;

    fn handle(&mut self, msg: StoreKeys, _: &mut SyncContext<Self>) -> Self::Result {
        let mut conn = self.pool.get()?;
        store::keys::store_keys(&mut conn, msg.address, &msg.keys, self.max_one_time_keys)
    }
}

impl Handler<CountKeys> for KeysActor {
    type Result = Result<(i64, i64), StoreError>;

    fn handle(&mut self, msg: CountKeys, _: &mut SyncContext<Self>) -> Self::Result {
        let mut conn = self.pool.get()?;
        store::keys::count_one_time_keys(&mut conn, msg.0)
    }
}

impl Handler<TakeBundle> for KeysActor {
    type Result = Result<Option<Bundle>, StoreError>;

    fn handle(&mut self, msg: TakeBundle, _: &mut SyncContext<Self>) -> Self::Result {
        let mut conn = self.pool.get()?;
        store::keys::take_bundle(&mut conn, msg.account, msg.device)
    }
}
