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
//!
//! An entry in use is read again before it expires: a send that finds it
//! past half the TTL (up to three quarters, spread by account, see
//! [`crate::refresh_age`]) is checked against it and starts one re-read in
//! the background. Before, every busy account's entry expired at once every
//! TTL, and each of its sends meanwhile waited for a database read of its
//! own (see BENCHMARKS.md): a stall every TTL on every busy conversation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::generations::{Generation, Generations};
use crate::clock::Tick;
use crate::domain::address::{AccountId, DeviceId};
use crate::error::ApiError;
use crate::store::{self, Pool};
use crate::FastMap;

/// Device id → registration id.
pub type DeviceSet = Arc<BTreeMap<u32, i64>>;

/// Entries kept at most; past it the cache starts over (cheap, and an
/// attacker cannot grow it without bound).
const MAX_ENTRIES: usize = 200_000;

struct Entry {
    at: Tick,
    set: DeviceSet,
    /// A re-read in the background was started: none is started again
    /// for this entry (one that fails leaves it to expire).
    refreshing: bool,
}

#[derive(Default)]
struct Inner {
    entries: FastMap<AccountId, Entry>,
    generations: Generations,
    /// Off while this node may be missing other nodes' invalidations.
    distrusted: bool,
}

impl Inner {
    /// Caches what a read begun at `began` found (`None`: no such account),
    /// unless a change was answered while it was in flight: that change
    /// may not be in it.
    fn store(&mut self, account: AccountId, began: Generation, set: Option<&DeviceSet>) {
        if self.distrusted || !self.generations.unchanged(account, began) {
            return;
        }
        let Some(set) = set else {
            self.entries.remove(&account);
            return;
        };
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.clear();
        }
        let entry = Entry {
            at: Tick::now(),
            set: set.clone(),
            refreshing: false,
        };
        self.entries.insert(account, entry);
    }
}

/// What the cache has for an account.
enum Cached {
    Fresh(DeviceSet),
    /// Usable, and past its refresh age: the caller reads it again (under
    /// `Generation`) in the background.
    Due(DeviceSet, Generation),
    /// Read it now, under this generation.
    Miss(Generation),
}

pub struct Directory {
    ttl: Duration,
    inner: Arc<Mutex<Inner>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Directory {
    pub fn new(ttl: Duration) -> Self {
        Directory {
            ttl,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    fn cached(&self, account: AccountId) -> Cached {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let began = inner.generations.noted(account);
        let entry = inner.entries.get_mut(&account);
        match entry.map(|e| (e.at.elapsed(), e)) {
            Some((age, e)) if !inner.distrusted && age < self.ttl => {
                if e.refreshing || age < crate::refresh_age(self.ttl, account.0.as_u128() as u16) {
                    Cached::Fresh(e.set.clone())
                } else {
                    e.refreshing = true;
                    Cached::Due(e.set.clone(), began)
                }
            }
            _ => Cached::Miss(began),
        }
    }

    /// The account's devices; `None` if the account does not exist.
    pub async fn devices(
        &self,
        pool: &Pool,
        account: AccountId,
    ) -> Result<Option<DeviceSet>, ApiError> {
        let began = match self.cached(account) {
            Cached::Fresh(set) => return Ok(Some(set)),
            Cached::Due(set, began) => {
                self.refresh(pool, account, began);
                return Ok(Some(set));
            }
            Cached::Miss(began) => began,
        };
        let set = store::blocking(pool, move |conn| {
            read(conn, account).map_err(ApiError::from)
        })
        .await?;
        // A set read across a change is still right for this send, which
        // began before the change was answered; `store` only keeps it out
        // of the cache.
        self.lock().store(account, began, set.as_ref());
        Ok(set)
    }

    /// Reads `account`'s set again on the blocking pool, nobody waiting.
    /// If the read fails (or crossed a change), the entry stays marked and
    /// expires as it would have: a database that fails is not asked again
    /// by every send meanwhile.
    fn refresh(&self, pool: &Pool, account: AccountId, began: Generation) {
        let inner = self.inner.clone();
        store::detached(
            pool,
            move |conn| read(conn, account),
            move |read| match read {
                Ok(set) => lock(&inner).store(account, began, set.as_ref()),
                Err(e) => log::warn!("cannot read a device set again: {e}"),
            },
        );
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

/// `account`'s device set from the database; `None` if it has no devices
/// (no such account).
fn read(
    conn: &mut store::Conn,
    account: AccountId,
) -> Result<Option<DeviceSet>, store::StoreError> {
    let rows = store::accounts::list_devices(conn, account)?;
    if rows.is_empty() {
        return Ok(None);
    }
    let set = rows
        .iter()
        .map(|d| {
            (
                DeviceId::from_db(d.device_id).0,
                i64::from(d.registration_id),
            )
        })
        .collect();
    Ok(Some(Arc::new(set)))
}
