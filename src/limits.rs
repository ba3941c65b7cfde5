//! Named GCRA rate limits over `ratelimit_meter`, one keyed limiter each.
//!
//! Keys are client IPs or account ids; the maps are bounded by
//! [`Limiters::evict_idle`], which the sweeper calls, so a flood of distinct
//! keys cannot grow memory without end.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ratelimit_meter::{KeyedRateLimiter, NonConformance, GCRA};

use crate::config::{Config, Rate};
use crate::domain::address::AccountId;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// One keyed limiter. The `Mutex` is held only for the check itself.
struct Keyed<K: Eq + Hash + Clone> {
    name: &'static str,
    inner: Mutex<KeyedRateLimiter<K, GCRA>>,
    /// The limiter's burst tolerance, to turn its "not until" (the
    /// theoretical arrival time) into the moment a request would conform.
    tolerance: Duration,
}

impl<K: Eq + Hash + Clone> Keyed<K> {
    /// `ratelimit_meter`'s GCRA with capacity `c` per `p` admits a burst of
    /// `c + 1` (its tolerance is the whole period). To make `"N/p"` mean a
    /// burst of exactly N at a sustained N per p, it is built as capacity
    /// N−1 per p·(N−1)/N: the same emission interval p/N, one cell less of
    /// tolerance. A limit of 1 cannot be expressed that way and admits 2.
    fn new(name: &'static str, rate: Rate) -> Self {
        let (capacity, period) = match NonZeroU32::new(rate.count.saturating_sub(1)) {
            Some(c) => (c, rate.per / rate.count * c.get()),
            None => (NonZeroU32::MIN, rate.per),
        };
        Keyed {
            name,
            inner: Mutex::new(KeyedRateLimiter::new(capacity, period)),
            tolerance: period,
        }
    }

    fn check(&self, key: K) -> Result<(), Duration> {
        let mut limiter = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        limiter.check(key).map_err(|not_until| {
            not_until
                .wait_time_from(Instant::now())
                .saturating_sub(self.tolerance)
        })
    }

    fn evict_idle(&self, idle: Duration) -> usize {
        let mut limiter = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        limiter.cleanup(idle).len()
    }
}

/// Every limit the server enforces.
pub struct Limiters {
    enabled: bool,
    metrics: Metrics,
    register: Keyed<IpAddr>,
    link: Keyed<IpAddr>,
    auth_failure: Keyed<IpAddr>,
    send: Keyed<AccountId>,
    bundle_account: Keyed<AccountId>,
    bundle_pair: Keyed<(AccountId, AccountId)>,
    provisioning: Keyed<AccountId>,
}

impl Limiters {
    pub fn new(config: &Config, metrics: Metrics) -> Self {
        let l = &config.limits;
        Limiters {
            enabled: config.rate_limits,
            metrics,
            register: Keyed::new("register_per_ip", l.register_per_ip),
            link: Keyed::new("link_per_ip", l.link_per_ip),
            auth_failure: Keyed::new("auth_failures_per_ip", l.auth_failures_per_ip),
            send: Keyed::new("sends_per_account", l.sends_per_account),
            bundle_account: Keyed::new("bundle_fetch_per_account", l.bundle_fetch_per_account),
            bundle_pair: Keyed::new("bundle_fetch_per_pair", l.bundle_fetch_per_pair),
            provisioning: Keyed::new("provisioning_per_account", l.provisioning_per_account),
        }
    }

    fn gate<K: Eq + Hash + Clone>(&self, limiter: &Keyed<K>, key: K) -> Result<(), ApiError> {
        if !self.enabled {
            return Ok(());
        }
        limiter.check(key).map_err(|wait| {
            self.metrics
                .rate_limited
                .with_label_values(&[limiter.name])
                .inc();
            ApiError::RateLimited {
                // Whole seconds, rounded up, and never 0 (clients would spin).
                retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
            }
        })
    }

    pub fn register(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.gate(&self.register, ip)
    }

    pub fn link(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.gate(&self.link, ip)
    }

    /// Counts one failed authentication; past the limit the client gets 429
    /// instead of 401, whatever it sends.
    pub fn auth_failure(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.gate(&self.auth_failure, ip)
    }

    pub fn send(&self, account: AccountId) -> Result<(), ApiError> {
        self.gate(&self.send, account)
    }

    /// Both the per-account and the per-(account, target) limit must allow it.
    pub fn bundle_fetch(&self, account: AccountId, target: AccountId) -> Result<(), ApiError> {
        self.gate(&self.bundle_account, account)?;
        if account != target {
            self.gate(&self.bundle_pair, (account, target))?;
        }
        Ok(())
    }

    pub fn provisioning(&self, account: AccountId) -> Result<(), ApiError> {
        self.gate(&self.provisioning, account)
    }

    /// Forgets keys idle for `idle`; returns how many were dropped.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        self.register.evict_idle(idle)
            + self.link.evict_idle(idle)
            + self.auth_failure.evict_idle(idle)
            + self.send.evict_idle(idle)
            + self.bundle_account.evict_idle(idle)
            + self.bundle_pair.evict_idle(idle)
            + self.provisioning.evict_idle(idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_of_n_admits_a_burst_of_exactly_n() {
        for n in [2u32, 3, 10, 100] {
            let k = Keyed::new("t", Rate::new(n, Duration::from_secs(3600)));
            for i in 0..n {
                assert!(k.check(1u8).is_ok(), "request {i} of {n} refused");
            }
            let wait = k.check(1u8).expect_err("burst exceeded");
            // The next cell conforms one emission interval (3600/n s) later.
            let interval = Duration::from_secs(3600) / n;
            assert!(
                wait <= interval && wait + Duration::from_secs(1) >= interval,
                "{wait:?}"
            );
            assert!(k.check(2u8).is_ok(), "other keys are independent");
        }
    }

    /// The longest period `Rate` accepts must not trip the limiter's `Instant` arithmetic
    /// (a period of `i64::MAX` seconds panicked on the first check, see `config.rs`).
    #[test]
    fn the_longest_rate_period_is_safe() {
        let per = Duration::from_secs(Rate::MAX_PERIOD_SECS);
        for n in [1u32, 2, 1000, u32::MAX] {
            let k = Keyed::new("t", Rate::new(n, per));
            for _ in 0..3 {
                let _ = k.check(1u8);
            }
            assert!(k.check(2u8).is_ok());
        }
    }
}
