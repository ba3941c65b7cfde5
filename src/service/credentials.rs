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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::generations::{Generation, Generations};
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::store::accounts::StoredSecret;

/// Accounts kept at most; past it the cache starts over.
const MAX_ACCOUNTS: usize = 200_000;

struct Entry {
    secret: StoredSecret,
    fetched: Instant,
}

#[derive(Default)]
struct Inner {
    accounts: HashMap<AccountId, HashMap<DeviceId, Entry>>,
    generations: Generations,
    /// Off while this node may be missing other nodes' deletions.
    distrusted: bool,
}

pub struct Credentials {
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl Credentials {
    pub fn new(ttl: Duration) -> Self {
        Credentials {
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, address: Address) -> Option<StoredSecret> {
        let inner = self.lock();
        if inner.distrusted {
            return None;
        }
        inner
            .accounts
            .get(&address.account)
            .and_then(|devices| devices.get(&address.device))
            .filter(|e| e.fetched.elapsed() < self.ttl)
            .map(|e| e.secret.clone())
    }

    /// Call before reading a secret from the database; pass the result to
    /// [`Credentials::put`].
    pub fn before_read(&self, account: AccountId) -> Generation {
        self.lock().generations.noted(account)
    }

    /// Caches what a read begun at `read_began` found, unless the account
    /// was invalidated since (the read may predate a deletion).
    pub fn put(&self, address: Address, secret: StoredSecret, read_began: Generation) {
        let mut inner = self.lock();
        if inner.distrusted || !inner.generations.unchanged(address.account, read_began) {
            return;
        }
        if inner.accounts.len() >= MAX_ACCOUNTS {
            inner.accounts.clear();
        }
        inner.accounts.entry(address.account).or_default().insert(
            address.device,
            Entry {
                secret,
                fetched: Instant::now(),
            },
        );
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
}
