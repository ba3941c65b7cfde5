//! `Generations`: change counters per account, so that a cache filled from
//! the database is never refilled with what a read saw before a change.
//!
//! A cache read that misses goes to the database, and a change to the
//! account can commit while that read is in flight. Invalidating the entry
//! after the commit is not enough: the read may finish later and store what
//! it saw before the change, which the cache would then serve until the
//! entry expires (a deleted device authenticating, a newly linked device
//! missing from the Sesame check). So every invalidation bumps the account's
//! generation, a read notes the generation before it starts, and its result
//! is stored only if the generation is still the same.
//!
//! Counters are striped over a fixed array indexed by the account id (a
//! random UUID, so accounts spread evenly): memory stays constant however
//! many accounts there are. Two accounts sharing a stripe only cost an
//! occasional result that is not cached, never a stale one.
//!
//! A `Generations` lives inside its cache's mutex: noting, checking and
//! bumping happen under the same lock as the entries they guard.

use crate::domain::address::AccountId;

/// Number of counters (a power of two).
const STRIPES: usize = 4096;

/// What a read noted before it started; see [`Generations::noted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

pub struct Generations {
    counters: Box<[u64]>,
}

impl Default for Generations {
    fn default() -> Self {
        Generations {
            counters: vec![0; STRIPES].into_boxed_slice(),
        }
    }
}

impl Generations {
    fn stripe(account: AccountId) -> usize {
        (account.0.as_u128() as usize) & (STRIPES - 1)
    }

    /// To be noted before a database read for `account` starts.
    pub fn noted(&self, account: AccountId) -> Generation {
        Generation(self.counters[Self::stripe(account)])
    }

    /// Whether nothing about `account` was invalidated since `noted`: only
    /// then may a read begun at `noted` be cached.
    pub fn unchanged(&self, account: AccountId, noted: Generation) -> bool {
        self.noted(account) == noted
    }

    /// Invalidates every account at once (a cache that may have missed
    /// invalidations, see [`super::directory::Directory::distrust`]).
    pub fn bump_all(&mut self) {
        for counter in self.counters.iter_mut() {
            *counter = counter.wrapping_add(1);
        }
    }

    /// Called on every invalidation of `account`, after its change committed.
    pub fn bump(&mut self, account: AccountId) {
        let counter = &mut self.counters[Self::stripe(account)];
        *counter = counter.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_between_noting_and_checking_forbids_caching() {
        let mut g = Generations::default();
        let (a, b) = (AccountId::random(), AccountId::random());
        let noted = g.noted(a);
        assert!(g.unchanged(a, noted));
        g.bump(a);
        assert!(!g.unchanged(a, noted));
        let again = g.noted(a);
        assert!(g.unchanged(a, again));
        // Another account's bump leaves `a` alone unless they share a stripe.
        let noted_b = g.noted(b);
        g.bump(a);
        assert_eq!(
            g.unchanged(b, noted_b),
            Generations::stripe(a) != Generations::stripe(b)
        );
    }
}
