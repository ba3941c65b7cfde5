//! A cheap monotonic clock for ages that a few milliseconds do not change:
//! how old a cached device set or mailbox count is (TTLs of seconds), how
//! long a peer has been silent (a minute), how long output has not moved.
//!
//! [`Tick::now`] reads `CLOCK_MONOTONIC_COARSE`: the time of the kernel's
//! last timer tick (1–4 ms behind), from the vDSO in about 4 ns, against
//! about 24 ns for `Instant::now()` on the benchmark machine. Ages were
//! read some seven times per relayed message, 2–3 % of the server's CPU
//! (BENCHMARKS.md, "The seventh sitting"). Deadlines that timers wait for
//! (ack timeouts) keep `std::time::Instant`.

use std::time::Duration;

/// A reading of the coarse clock. Only differences mean anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(Duration);

impl Tick {
    pub fn now() -> Tick {
        let ts = rustix::time::clock_gettime(COARSE);
        Tick(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// How long ago this was (zero, never negative, if the clock is read
    /// on another CPU a tick behind).
    pub fn elapsed(self) -> Duration {
        Tick::now().since(self)
    }

    /// How long after `earlier` this was (zero if it was not).
    pub fn since(self, earlier: Tick) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
const COARSE: rustix::time::ClockId = rustix::time::ClockId::MonotonicCoarse;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const COARSE: rustix::time::ClockId = rustix::time::ClockId::Monotonic;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_monotonic_clock_within_a_few_milliseconds() {
        let (start, exact) = (Tick::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (coarse, precise) = (start.elapsed(), exact.elapsed());
        assert!(coarse >= Duration::from_millis(20), "{coarse:?}");
        let apart = coarse.abs_diff(precise);
        assert!(
            apart <= Duration::from_millis(12),
            "{coarse:?} vs {precise:?}"
        );
        assert_eq!(start.since(Tick::now()), Duration::ZERO, "never negative");
    }
}
