//! `Directory`: each account's current devices and registration ids, as the
//! send path's Sesame check needs them, cached in memory.
//!
//! Every send needs the destination's device set. Reading it from the
//! database costs a blocking-pool hop and a SQLite read lock per send, and
//! at tens of thousands of sends a second those context switches were most of
//! the server's CPU (see BENCHMARKS.md). This process changes a device set
//! only by registering, linking or deleting, and each of these invalidates
//! the entry after its commit, and a read begun before a change is not
//! cached if it finishes after it ([`Generations`]), so on one process the
//! cache is exact: from the moment a link or delete is answered, every send
//! is checked against the new set. When several processes share one
//! PostgreSQL database as a cluster, every change is announced to every node
//! before it is answered (`service::cluster`), and while a node cannot hear
//! those announcements it does not cache at all ([`Directory::distrust`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::generations::{Generation, Generations};
use crate::domain::address::{AccountId, DeviceId};
use crate::error::ApiError;
use crate::store::{self, Pool};
use crate::FastMap;

/// Device id → registration id.
pub type DeviceSet = Arc<BTreeMap<u32, i64>>;

/// Entries kept at most; past it the cache starts over (cheap, and an
/// attacker cannot grow it without bound).
const MAX_ENTRIES: usize = 200_000;

#[derive(Default)]
struct Inner {
    entries: FastMap<AccountId, (Instant, DeviceSet)>,
    generations: Generations,
    /// Off while this node may be missing other nodes' invalidations.
    distrusted: bool,
}

pub struct Directory {
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl Directory {
    pub fn new(ttl: Duration) -> Self {
        Directory {
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached set, or, on a miss, the generation to read under.
    fn cached(&self, account: AccountId) -> Result<DeviceSet, Generation> {
        let inner = self.lock();
        inner
            .entries
            .get(&account)
            .filter(|(at, _)| !inner.distrusted && at.elapsed() < self.ttl)
            .map(|(_, set)| set.clone())
            .ok_or_else(|| inner.generations.noted(account))
    }

    /// The account's devices; `None` if the account does not exist.
    pub async fn devices(
        &self,
        pool: &Pool,
        account: AccountId,
    ) -> Result<Option<DeviceSet>, ApiError> {
        let began = match self.cached(account) {
            Ok(set) => return Ok(Some(set)),
            Err(began) => began,
        };
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
        let mut inner = self.lock();
        // A change answered while this read was in flight may not be in
        // `set`: use it for this send (which began before the change was
        // answered), but do not cache it.
        if !inner.distrusted && inner.generations.unchanged(account, began) {
            if inner.entries.len() >= MAX_ENTRIES {
                inner.entries.clear();
            }
            inner.entries.insert(account, (Instant::now(), set.clone()));
        }
        Ok(Some(set))
    }

    /// Forgets `account`'s entry, and keeps reads already in flight from
    /// putting it back: call after any change to its devices, after the
    /// change is committed.
    pub fn invalidate(&self, account: AccountId) {
        let mut inner = self.lock();
        inner.generations.bump(account);
        inner.entries.remove(&account);
    }

    /// In a cluster, while this node cannot hear other nodes' changes (the
    /// bus is down): forget everything and read every set from the database
    /// until [`Directory::trust`]. Exact again, at a database read per send.
    pub fn distrust(&self) {
        let mut inner = self.lock();
        inner.distrusted = true;
        inner.generations.bump_all();
        inner.entries.clear();
    }

    /// The bus is up again: other nodes' changes reach this node.
    pub fn trust(&self) {
        self.lock().distrusted = false;
    }
}
