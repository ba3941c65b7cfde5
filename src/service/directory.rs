//! `Directory`: each account's current devices and registration ids, as the
//! send path's Sesame check needs them, cached in memory.
//!
//! Every send needs the destination's device set. Reading it from the
//! database costs a blocking-pool hop and a SQLite read lock per send, and
//! at tens of thousands of sends a second those context switches were most of
//! the server's CPU (see BENCHMARKS.md). This process changes a device set
//! only by registering, linking or deleting, and each of these invalidates
//! the entry, so on one process the cache is exact. When several processes
//! share one PostgreSQL database, another process's change is seen once the
//! entry's TTL has run out.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::domain::address::{AccountId, DeviceId};
use crate::error::ApiError;
use crate::store::{self, Pool};

/// Device id → registration id.
pub type DeviceSet = Arc<BTreeMap<u32, i64>>;

/// Entries kept at most; past it the cache starts over (cheap, and an
/// attacker cannot grow it without bound).
const MAX_ENTRIES: usize = 200_000;

pub struct Directory {
    ttl: Duration,
    entries: Mutex<HashMap<AccountId, (Instant, DeviceSet)>>,
}

impl Directory {
    pub fn new(ttl: Duration) -> Self {
        Directory {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, account: AccountId) -> Option<DeviceSet> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&account)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, set)| set.clone())
    }

    /// The account's devices; `None` if the account does not exist.
    pub async fn devices(
        &self,
        pool: &Pool,
        account: AccountId,
    ) -> Result<Option<DeviceSet>, ApiError> {
        if let Some(set) = self.cached(account) {
            return Ok(Some(set));
        }
        let rows = store::blocking(pool, move |conn| {
            store::accounts::list_devices(conn, account).map_err(ApiError::from)
        })
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let set: DeviceSet = Arc::new(
            rows.iter()
                .map(|d| {
                    (
                        DeviceId::from_db(d.device_id).0,
                        i64::from(d.registration_id),
                    )
                })
                .collect(),
        );
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(account, (Instant::now(), set.clone()));
        Ok(Some(set))
    }

    /// Forgets `account`'s entry: call after any change to its devices,
    /// after the change is committed.
    pub fn invalidate(&self, account: AccountId) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&account);
    }
}
