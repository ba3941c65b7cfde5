//! `Credentials`: the stored salt and hash of recently authenticated
//! devices, cached in memory so an authenticated request does not need a
//! database read (and a blocking-pool hop) before it can start.
//!
//! A device's secret never changes, so a cached entry can only go stale by
//! the device (or its account) being deleted: this process invalidates the
//! entry when it deletes, after the commit; in a cluster every node does so
//! before the deletion is answered (`service::cluster`), and a node that
//! cannot hear the others caches nothing ([`Credentials::distrust`]).
//! Entries also expire after `device_cache_ttl_ms`. A read begun before a deletion
//! can finish after it; [`Generations`] keep it from putting the deleted
//! device back. Verification itself (salted SHA-256, constant-time compare)
//! runs on every request; only the lookup is cached. Unknown devices are
//! never cached.
//!
//! An entry in use is read again before it expires, as the device sets are
//! (see [`super::directory`]): a request that finds it past its refresh age
//! ([`crate::refresh_age`]) is verified against it and starts one re-read
//! in the background. Before, a device authenticating by HTTP request by
//! request waited for a database read every TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::generations::{Generation, Generations};
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::store::accounts::StoredSecret;
use crate::store::{self, Pool};

/// Accounts kept at most; past it the cache starts over.
const MAX_ACCOUNTS: usize = 200_000;

struct Entry {
    secret: StoredSecret,
    fetched: Instant,
    /// A re-read in the background was started: none is started again
    /// for this entry (one that fails leaves it to expire).
    refreshing: bool,
}

#[derive(Default)]
struct Inner {
    accounts: HashMap<AccountId, HashMap<DeviceId, Entry>>,
    generations: Generations,
    /// Off while this node may be missing other nodes' deletions.
    distrusted: bool,
}

impl Inner {
    /// Caches what a read begun at `read_began` found (`None`: no such
    /// device), unless the account was invalidated since (the read may
    /// predate a deletion).
    fn store(&mut self, address: Address, secret: Option<StoredSecret>, read_began: Generation) {
        if self.distrusted || !self.generations.unchanged(address.account, read_began) {
            return;
        }
        let Some(secret) = secret else {
            if let Some(devices) = self.accounts.get_mut(&address.account) {
                devices.remove(&address.device);
            }
            return;
        };
        if self.accounts.len() >= MAX_ACCOUNTS {
            self.accounts.clear();
        }
        self.accounts.entry(address.account).or_default().insert(
            address.device,
            Entry {
                secret,
                fetched: Instant::now(),
                refreshing: false,
            },
        );
    }
}

/// A cached secret; `refresh`: it is due to be read again, under this
/// generation.
pub struct Cached {
    pub secret: StoredSecret,
    pub refresh: Option<Generation>,
}

pub struct Credentials {
    ttl: Duration,
    inner: Arc<Mutex<Inner>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Credentials {
    pub fn new(ttl: Duration) -> Self {
        Credentials {
            ttl,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// The cached secret of `address`, if any. One past its refresh age is
    /// returned too, with the generation to read it again under (once):
    /// the caller passes it to [`Credentials::refresh`].
    pub fn get(&self, address: Address) -> Option<Cached> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.distrusted {
            return None;
        }
        let began = inner.generations.noted(address.account);
        let entry = inner
            .accounts
            .get_mut(&address.account)
            .and_then(|devices| devices.get_mut(&address.device))?;
        let age = entry.fetched.elapsed();
        if age >= self.ttl {
            return None;
        }
        let due = age >= crate::refresh_age(self.ttl, address.spread_key());
        let refresh = (!entry.refreshing && due).then(|| {
            entry.refreshing = true;
            began
        });
        Some(Cached {
            secret: entry.secret.clone(),
            refresh,
        })
    }

    /// Reads `address`'s secret again on the blocking pool, nobody waiting.
    /// If the read fails, the entry stays marked and expires as it would
    /// have: a database that fails is not asked again by every request.
    pub fn refresh(&self, pool: &Pool, address: Address, began: Generation) {
        let inner = self.inner.clone();
        store::detached(
            pool,
            move |conn| store::accounts::find_secret(conn, address),
            move |read| match read {
                Ok(found) => lock(&inner).store(address, found, began),
                Err(e) => log::warn!("cannot read a device's credentials again: {e}"),
            },
        );
    }

    /// Call before reading a secret from the database; pass the result to
    /// [`Credentials::put`].
    pub fn before_read(&self, account: AccountId) -> Generation {
        self.lock().generations.noted(account)
    }

    /// Caches what a read begun at `read_began` found, unless the account
    /// was invalidated since (the read may predate a deletion).
    pub fn put(&self, address: Address, secret: StoredSecret, read_began: Generation) {
        self.lock().store(address, Some(secret), read_began);
    }

    /// Records that `address` was seen at `at` (ms), so the next request
    /// does not write `lastSeenAt` again.
    pub fn seen(&self, address: Address, at: i64) {
        if let Some(e) = self
            .lock()
            .accounts
            .get_mut(&address.account)
            .and_then(|d| d.get_mut(&address.device))
        {
            e.secret.last_seen_at = at;
        }
    }

    /// After `address` was deleted (and the deletion committed).
    pub fn forget_device(&self, address: Address) {
        let mut inner = self.lock();
        inner.generations.bump(address.account);
        if let Some(devices) = inner.accounts.get_mut(&address.account) {
            devices.remove(&address.device);
        }
    }

    /// See [`super::directory::Directory::distrust`].
    pub fn distrust(&self) {
        let mut inner = self.lock();
        inner.distrusted = true;
        inner.generations.bump_all();
        inner.accounts.clear();
    }

    pub fn trust(&self) {
        self.lock().distrusted = false;
    }

    /// After `account` was deleted (and the deletion committed).
    pub fn forget_account(&self, account: AccountId) {
        let mut inner = self.lock();
        inner.generations.bump(account);
        inner.accounts.remove(&account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> StoredSecret {
        StoredSecret {
            salt: vec![1],
            hash: vec![2],
            last_seen_at: 0,
        }
    }

    /// The race: a read begins, the device is deleted and forgotten, then
    /// the read finishes and puts what it saw. It must not be cached.
    #[test]
    fn a_read_begun_before_a_deletion_does_not_refill_the_cache() {
        let cache = Credentials::new(Duration::from_secs(60));
        let device = Address::new(AccountId::random(), DeviceId(2));
        let began = cache.before_read(device.account);
        cache.forget_device(device);
        cache.put(device, secret(), began);
        assert!(cache.get(device).is_none());

        let began = cache.before_read(device.account);
        cache.forget_account(device.account);
        cache.put(device, secret(), began);
        assert!(cache.get(device).is_none());

        // A read begun after the deletion is cached as before.
        let began = cache.before_read(device.account);
        cache.put(device, secret(), began);
        assert!(cache.get(device).is_some());
    }

    #[test]
    fn an_entry_in_use_is_read_again_once_before_it_expires() {
        let cache = Credentials::new(Duration::from_millis(100));
        let device = Address::new(AccountId::random(), DeviceId(1));
        let began = cache.before_read(device.account);
        cache.put(device, secret(), began);
        let fresh = cache.get(device).expect("cached");
        assert!(fresh.refresh.is_none(), "a fresh entry is not read again");
        std::thread::sleep(Duration::from_millis(80));
        // Past its refresh age (50–75 ms): served, and due once.
        let due = cache.get(device).expect("still cached");
        let began = due.refresh.expect("due for a read");
        assert!(cache.get(device).expect("cached").refresh.is_none());
        // The read found the device gone (deleted by a process this one
        // does not hear from): the entry goes at once, not at its TTL.
        cache.lock().store(device, None, began);
        assert!(cache.get(device).is_none());
    }

    #[test]
    fn a_read_that_never_comes_back_lets_the_entry_expire() {
        let cache = Credentials::new(Duration::from_millis(60));
        let device = Address::new(AccountId::random(), DeviceId(1));
        cache.put(device, secret(), cache.before_read(device.account));
        std::thread::sleep(Duration::from_millis(46));
        assert!(cache.get(device).expect("cached").refresh.is_some());
        std::thread::sleep(Duration::from_millis(20));
        assert!(cache.get(device).is_none(), "used past its TTL");
    }
}
