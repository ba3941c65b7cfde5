//! One keyed GCRA limiter: the arithmetic behind every [`super::Limit`].

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Rate;

/// One keyed GCRA limiter. The `Mutex` is held only for one check, or for
/// one eviction pass over the map.
pub(super) struct Keyed<K: Eq + Hash + Clone> {
    pub(super) name: &'static str,
    /// The sustained spacing of requests: `per / count`.
    interval: Duration,
    /// How far a key's TAT may run ahead of now: `interval × (count − 1)`,
    /// so a fresh key admits a burst of exactly `count`.
    tolerance: Duration,
    /// Keys kept at most (see [`Keyed::make_room`]).
    cap: usize,
    /// Per key, its theoretical arrival time (TAT): when the key's next
    /// request would be on schedule. A TAT not after now means the bucket is
    /// full again, the same as an absent key; such entries may go at any time.
    tats: Mutex<HashMap<K, Instant>>,
}

impl<K: Eq + Hash + Clone> Keyed<K> {
    pub(super) fn new(name: &'static str, rate: Rate, cap: usize) -> Self {
        let interval = rate.per / rate.count.max(1);
        Keyed {
            name,
            interval,
            tolerance: interval * rate.count.saturating_sub(1),
            cap: cap.max(1),
            tats: Mutex::new(HashMap::new()),
        }
    }

    /// Its GCRA parameters (interval, tolerance), for a shared limiter.
    pub(super) fn gcra(&self) -> (Duration, Duration) {
        (self.interval, self.tolerance)
    }

    pub(super) fn check(&self, key: K) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// Admits one request for `key` at `now`, or says how long until one
    /// would be admitted.
    fn check_at(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let tat = tats.get(&key).map_or(now, |&t| t.max(now));
        let ahead = tat.saturating_duration_since(now);
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        // `Rate` bounds the period to 100 years, so this cannot overflow;
        // were it to, the key would stay where it is rather than panic.
        let next = tat.checked_add(self.interval).unwrap_or(tat);
        if !tats.contains_key(&key) && tats.len() >= self.cap {
            self.make_room(&mut tats, now);
        }
        tats.insert(key, next);
        Ok(())
    }

    /// The map is at its cap and a new key arrives. Refusing new keys would
    /// let anyone with enough addresses lock every other client out, so a
    /// full map evicts instead: first every key whose bucket is full again
    /// (that loses nothing), then, if the map is still more than 7/8 full,
    /// the keys nearest to full, down to 7/8 of the cap. An evicted key only
    /// ever gets back the part of its burst it had not yet regained, so no
    /// client is refused because of someone else's flood, and the keys that
    /// are limited hardest (a flooder's own) are the last to go. Forcing the
    /// eviction of a key still well short of full takes more than `cap`
    /// distinct keys that are all themselves being limited: at that point
    /// the flooder already has `cap` fresh bursts of its own. Bringing the
    /// map down to 7/8 means this O(n) pass runs at most once per `cap / 8`
    /// new keys.
    fn make_room(&self, tats: &mut HashMap<K, Instant>, now: Instant) {
        let before = tats.len();
        tats.retain(|_, tat| *tat > now);
        let target = self.cap - (self.cap / 8).max(1);
        if tats.len() > target {
            let excess = tats.len() - target;
            let mut by_tat: Vec<(Instant, K)> = tats.iter().map(|(k, &t)| (t, k.clone())).collect();
            by_tat.select_nth_unstable_by_key(excess - 1, |(t, _)| *t);
            for (_, key) in by_tat.drain(..excess) {
                tats.remove(&key);
            }
            log::warn!(
                "rate limit {}: {} keys tracked (the cap); forgot the {excess} nearest to full",
                self.name,
                before
            );
        }
    }

    /// Forgets every key whose bucket is full again at `now`; returns how many.
    pub(super) fn evict_replenished(&self, now: Instant) -> usize {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let before = tats.len();
        tats.retain(|_, tat| *tat > now);
        // Give back the memory of a flood that is over.
        if tats.capacity() > 2 * tats.len() + 1024 {
            tats.shrink_to_fit();
        }
        before - tats.len()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tats.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_KEYS;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_rate_of_n_admits_a_burst_of_exactly_n() {
        for n in [1u32, 2, 3, 10, 100] {
            let k = Keyed::new("t", Rate::new(n, HOUR), MAX_KEYS);
            for i in 0..n {
                assert!(k.check(1u8).is_ok(), "request {i} of {n} refused");
            }
            let wait = k.check(1u8).expect_err("burst exceeded");
            // The next cell conforms one emission interval (3600/n s) later.
            let interval = HOUR / n;
            assert!(
                wait <= interval && wait + Duration::from_secs(1) >= interval,
                "{wait:?}"
            );
            assert!(k.check(2u8).is_ok(), "other keys are independent");
        }
    }

    /// The longest period `Rate` accepts must not trip the limiter's `Instant` arithmetic
    /// (a period of `i64::MAX` seconds panicked on the first check, see `config/rate.rs`).
    #[test]
    fn the_longest_rate_period_is_safe() {
        let per = Duration::from_secs(Rate::MAX_PERIOD_SECS);
        for n in [1u32, 2, 1000, u32::MAX] {
            let k = Keyed::new("t", Rate::new(n, per), MAX_KEYS);
            for _ in 0..3 {
                let _ = k.check(1u8);
            }
            assert!(k.check(2u8).is_ok());
            assert_eq!(k.evict_replenished(Instant::now()), 0);
        }
    }

    /// A key whose bucket is full again is forgotten; a key still being
    /// limited is kept (forgetting it would hand it a fresh burst), and is
    /// forgotten once it has regained its burst, after which it behaves as new.
    #[test]
    fn replenished_keys_are_evicted_and_limited_ones_kept() {
        let k = Keyed::new("t", Rate::new(10, Duration::from_secs(1)), MAX_KEYS);
        let t0 = Instant::now();
        assert!(k.check_at(1u8, t0).is_ok());
        for _ in 0..10 {
            assert!(k.check_at(2u8, t0).is_ok());
        }
        assert!(k.check_at(2u8, t0).is_err());
        assert_eq!(k.len(), 2);

        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(k.evict_replenished(t1), 1, "key 1 is full again at t1");
        assert_eq!(k.len(), 1);
        assert!(k.check_at(2u8, t1).is_ok(), "key 2 regained two cells");
        assert!(k.check_at(2u8, t1).is_ok());
        assert!(k.check_at(2u8, t1).is_err(), "key 2 kept its state");

        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(k.evict_replenished(t2), 1);
        assert_eq!(k.len(), 0);
        for _ in 0..10 {
            assert!(k.check_at(2u8, t2).is_ok());
        }
        assert!(k.check_at(2u8, t2).is_err());
    }

    /// At its cap a limiter evicts rather than grows or refuses: replenished
    /// keys first, then the keys nearest to full. A key drained hardest
    /// keeps its state through a flood of new keys.
    #[test]
    fn a_full_limiter_evicts_and_never_grows_past_its_cap() {
        let cap = 8;
        let k = Keyed::new("t", Rate::new(2, HOUR), cap);
        let t0 = Instant::now();
        // Key 0 spends its whole burst; keys 1..8 one cell each.
        assert!(k.check_at(0u32, t0).is_ok());
        assert!(k.check_at(0u32, t0).is_ok());
        for key in 1..cap as u32 {
            assert!(k.check_at(key, t0).is_ok());
        }
        assert_eq!(k.len(), cap);
        // A flood of new keys, none of them refused, the map never past the cap.
        for key in 100..1_000u32 {
            assert!(k.check_at(key, t0).is_ok(), "new key {key} refused");
            assert!(k.len() <= cap, "{} keys", k.len());
        }
        assert!(k.check_at(0u32, t0).is_err(), "the drained key was evicted");

        // 45 min later every one-cell key is full again, key 0 is not: a new
        // key evicts all of them and nothing else.
        let t1 = t0 + HOUR * 3 / 4;
        assert!(k.check_at(5_000u32, t1).is_ok());
        assert_eq!(k.len(), 2);
        assert!(k.check_at(0u32, t1).is_ok(), "key 0 regained one cell");
        assert!(k.check_at(0u32, t1).is_err(), "and only one");
    }
}
