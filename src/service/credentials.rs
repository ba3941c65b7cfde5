//! `Credentials`: the stored salt and hash of recently authenticated
//! devices, cached in memory so an authenticated request does not need a
//! database read (and a blocking-pool hop) before it can start.
//!
//! A device's secret never changes, so a cached entry can only go stale by
//! the device (or its account) being deleted: this process invalidates the
//! entry when it deletes, and entries expire after the directory TTL, which
//! bounds how long a deletion made by another process sharing the database
//! goes unseen. Verification itself (salted SHA-256, constant-time compare)
//! runs on every request; only the lookup is cached. Unknown devices are
//! never cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::address::{AccountId, Address, DeviceId};
use crate::store::accounts::StoredSecret;

/// Accounts kept at most; past it the cache starts over.
const MAX_ACCOUNTS: usize = 200_000;

struct Entry {
    secret: StoredSecret,
    fetched: Instant,
}

pub struct Credentials {
    ttl: Duration,
    accounts: Mutex<HashMap<AccountId, HashMap<DeviceId, Entry>>>,
}

impl Credentials {
    pub fn new(ttl: Duration) -> Self {
        Credentials {
            ttl,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, address: Address) -> Option<StoredSecret> {
        let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        accounts
            .get(&address.account)
            .and_then(|devices| devices.get(&address.device))
            .filter(|e| e.fetched.elapsed() < self.ttl)
            .map(|e| e.secret.clone())
    }

    pub fn put(&self, address: Address, secret: StoredSecret) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if accounts.len() >= MAX_ACCOUNTS {
            accounts.clear();
        }
        accounts.entry(address.account).or_default().insert(
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
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = accounts
            .get_mut(&address.account)
            .and_then(|d| d.get_mut(&address.device))
        {
            e.secret.last_seen_at = at;
        }
    }

    pub fn forget_device(&self, address: Address) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(devices) = accounts.get_mut(&address.account) {
            devices.remove(&address.device);
        }
    }

    pub fn forget_account(&self, account: AccountId) {
        self.accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&account);
    }
}
