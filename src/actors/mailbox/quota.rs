//! `Quota`: each device's mailbox room, reserved before a send is routed, so
//! a send refused with `507` has delivered nothing (SPEC: "A send answered
//! with an error status delivered nothing").
//!
//! Every copy that may end up stored (every non-ephemeral copy) holds a
//! [`Reserved`] slot from the moment its send is accepted until its outcome
//! is known: acknowledged live (the slot is released), or committed to the
//! mailbox. A send is accepted only if every destination device has room
//! for its copy counting both what is stored and what is reserved, so the
//! cap holds exactly under any concurrency within one process.
//!
//! A slot is bound to its copy once the copy exists ([`Reserved::bind`]):
//! the copy carries a [`SlotHold`](crate::domain::envelope::SlotHold),
//! and whichever comes first takes it: the writer's commit of the copy
//! (which counts it stored and unreserved in one critical section) or the
//! slot's drop when the sender has its answer (which releases it). So the
//! copy is never counted twice (stored, and still reserved until its
//! sender hears the outcome, which refused concurrent sends with room to
//! spare) nor not at all. Binding is one atomic store on the copy: no
//! lock, no set of guids.
//!
//! Stored counts are read by the mailbox writer's thread, in order with its
//! own commits, and kept up to date by it; each count is read again after
//! `ttl`, which bounds how long writes by another process sharing the
//! database (or the retention sweep) go unseen. Reservations are this
//! process's own and survive the re-read.
//!
//! A count in use is read again ahead of time: a reservation that finds it
//! past half the `ttl` (up to three quarters, spread by device, see
//! [`crate::refresh_age`]) is granted on it and asks for one re-read in
//! the background ([`Reserve::Granted`]'s `refresh`). Before, every count
//! in use expired at once every `ttl`, and each device's next sends waited
//! for the writer's next round (behind its commit) before they could be
//! routed: a stall every `ttl` on every busy conversation (see
//! BENCHMARKS.md, "The fifth sitting").

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::Tick;

use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::envelope::Envelope;
use crate::FastMap;

/// Devices whose counts are kept at most; past it, unreserved ones are
/// forgotten (and read again when next needed).
const MAX_DEVICES: usize = 100_000;

struct Slot {
    stored: i64,
    reserved: i64,
    loaded: Tick,
    /// A re-read was asked for and has not come back.
    refreshing: bool,
}

impl Slot {
    fn new(stored: i64) -> Self {
        Slot {
            stored,
            reserved: 0,
            loaded: Tick::now(),
            refreshing: false,
        }
    }
}

pub struct Quota {
    cap: i64,
    ttl: Duration,
    slots: Mutex<FastMap<Address, Slot>>,
}

/// The outcome of [`Quota::reserve`].
pub enum Reserve {
    /// One slot per destination, in the order asked; and the counts due
    /// for a re-read in the background (past [`crate::refresh_age`], asked
    /// for once): the caller passes them to
    /// [`super::MailboxWriter::load_counts`] without waiting.
    Granted {
        slots: Vec<Reserved>,
        refresh: Vec<Address>,
    },
    /// Some destination's mailbox has no room.
    Full,
    /// These counts must be read first ([`super::MailboxWriter::load_counts`]).
    Unknown(Vec<Address>),
}

impl Quota {
    pub fn new(cap: u64, ttl: Duration) -> Arc<Self> {
        Arc::new(Quota {
            cap: i64::try_from(cap).unwrap_or(i64::MAX),
            ttl,
            slots: Mutex::new(FastMap::default()),
        })
    }

    fn slots(&self) -> MutexGuard<'_, FastMap<Address, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves one slot in each of `dests` (distinct addresses), all or none.
    pub fn reserve(self: &Arc<Self>, dests: &[Address]) -> Reserve {
        let mut slots = self.slots();
        let (ttl, now) = (self.ttl, Tick::now());
        let unknown: Vec<Address> = dests
            .iter()
            .filter(|d| slots.get(d).is_none_or(|s| now.since(s.loaded) > ttl))
            .copied()
            .collect();
        if !unknown.is_empty() {
            return Reserve::Unknown(unknown);
        }
        let full = dests.iter().any(|d| {
            let s = &slots[d];
            s.stored + s.reserved >= self.cap
        });
        if full {
            return Reserve::Full;
        }
        let mut refresh = Vec::new();
        for d in dests {
            if let Some(s) = slots.get_mut(d) {
                s.reserved += 1;
                if !s.refreshing && now.since(s.loaded) > crate::refresh_age(ttl, d.spread_key()) {
                    s.refreshing = true;
                    refresh.push(*d);
                }
            }
        }
        let slots = dests
            .iter()
            .map(|&dest| Reserved {
                quota: self.clone(),
                dest,
                copy: None,
            })
            .collect();
        Reserve::Granted { slots, refresh }
    }

    /// From the writer thread after a commit: what it changed. A copy
    /// stored that still held its slot moves from reserved to stored.
    /// Counts not loaded are left alone.
    pub fn committed(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut slots = self.slots();
        for change in changes {
            match *change {
                Change::Stored { dest, took_slot } => {
                    if let Some(s) = slots.get_mut(&dest) {
                        s.stored += 1;
                        if took_slot {
                            s.reserved = (s.reserved - 1).max(0);
                        }
                    }
                }
                Change::Deleted(dest) => {
                    if let Some(s) = slots.get_mut(&dest) {
                        s.stored = (s.stored - 1).max(0);
                    }
                }
            }
        }
    }

    /// From the writer thread: counts it just read, after its last commit.
    /// A slot loaded within `ttl` keeps its own (it has seen every commit
    /// since), unless it asked for this re-read; a stale or refreshing one
    /// takes the new count and keeps its reservations. (The new count is
    /// never behind the slot's: the writer applies each commit's deltas
    /// before it reads.)
    pub fn loaded(&self, counts: &[(Address, i64)]) {
        let mut slots = self.slots();
        if slots.len() + counts.len() > MAX_DEVICES {
            slots.retain(|_, s| s.reserved > 0);
        }
        let ttl = self.ttl;
        for &(dest, stored) in counts {
            match slots.get_mut(&dest) {
                Some(s) if !s.refreshing && s.loaded.elapsed() <= ttl => {}
                Some(s) => {
                    s.stored = stored;
                    s.loaded = Tick::now();
                    s.refreshing = false;
                }
                None => {
                    slots.insert(dest, Slot::new(stored));
                }
            }
        }
    }

    /// Forgets the counts of a deleted device (`Some`) or account (`None`),
    /// so a device id used again starts from what the database holds.
    pub fn forget(&self, account: AccountId, device: Option<DeviceId>) {
        self.slots().retain(|a, s| {
            s.reserved > 0 || a.account != account || device.is_some_and(|d| d != a.device)
        });
    }

    fn release(&self, dest: Address) {
        if let Some(s) = self.slots().get_mut(&dest) {
            s.reserved = (s.reserved - 1).max(0);
        }
    }
}

/// What a mailbox commit changed, for [`Quota::committed`].
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// A copy new in `dest`'s mailbox; `took_slot` if it still held its
    /// reserved slot ([`crate::domain::envelope::SlotHold::take`]).
    Stored { dest: Address, took_slot: bool },
    /// An acknowledged copy deleted from `dest`'s mailbox.
    Deleted(Address),
}

/// One reserved slot in `dest`'s mailbox; released when dropped, unless
/// the commit of its copy took it first. Hold it until the copy is
/// acknowledged or committed.
pub struct Reserved {
    quota: Arc<Quota>,
    dest: Address,
    /// The copy, once bound: it holds the slot until taken.
    copy: Option<Arc<Envelope>>,
}

impl Reserved {
    /// The slot is `copy`'s: its commit to the mailbox takes the slot.
    /// Call before the copy is handed on.
    pub fn bind(&mut self, copy: &Arc<Envelope>) {
        if self.copy.is_none() {
            copy.slot.hold();
            self.copy = Some(copy.clone());
        }
    }
}

impl std::fmt::Debug for Reserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reserved({})", self.dest)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        // A bound slot no longer held was taken by its copy's commit.
        if self.copy.as_ref().is_none_or(|c| c.slot.take()) {
            self.quota.release(self.dest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(device: u32) -> Address {
        Address::new(AccountId(uuid::Uuid::nil()), DeviceId(device))
    }

    fn copy() -> Arc<Envelope> {
        Arc::new(Envelope::test_copy())
    }

    /// What the writer reports after committing `copy` to device 1.
    fn stored(copy: &Envelope) -> Change {
        Change::Stored {
            dest: addr(1),
            took_slot: copy.slot.take(),
        }
    }

    fn granted(r: Reserve) -> Vec<Reserved> {
        match r {
            Reserve::Granted { slots, .. } => slots,
            Reserve::Full => panic!("full"),
            Reserve::Unknown(_) => panic!("unknown"),
        }
    }

    #[test]
    fn asks_for_unknown_counts_first() {
        let q = Quota::new(2, Duration::from_secs(60));
        match q.reserve(&[addr(1), addr(2)]) {
            Reserve::Unknown(u) => assert_eq!(u, vec![addr(1), addr(2)]),
            _ => panic!("expected unknown"),
        }
        q.loaded(&[(addr(1), 0), (addr(2), 0)]);
        assert_eq!(granted(q.reserve(&[addr(1), addr(2)])).len(), 2);
    }

    #[test]
    fn refuses_all_when_one_device_is_full_and_releases_on_drop() {
        let q = Quota::new(2, Duration::from_secs(60));
        q.loaded(&[(addr(1), 1), (addr(2), 0)]);
        let first = granted(q.reserve(&[addr(1), addr(2)]));
        // Device 1: one stored + one reserved = cap.
        assert!(matches!(q.reserve(&[addr(1), addr(2)]), Reserve::Full));
        // Device 2 was not charged by the refused send.
        let only2 = granted(q.reserve(&[addr(2)]));
        assert!(matches!(q.reserve(&[addr(2)]), Reserve::Full));
        drop(only2);
        drop(first);
        assert_eq!(granted(q.reserve(&[addr(1), addr(2)])).len(), 2);
    }

    #[test]
    fn commits_move_reserved_to_stored() {
        let q = Quota::new(1, Duration::from_secs(60));
        q.loaded(&[(addr(1), 0)]);
        let slot = granted(q.reserve(&[addr(1)]));
        // Not bound: a copy relayed from another node, say.
        q.committed(&[stored(&copy())]);
        drop(slot);
        assert!(matches!(q.reserve(&[addr(1)]), Reserve::Full));
        q.committed(&[Change::Deleted(addr(1))]);
        assert_eq!(granted(q.reserve(&[addr(1)])).len(), 1);
    }

    #[test]
    fn a_bound_copy_committed_is_counted_once_before_its_slot_is_dropped() {
        let q = Quota::new(2, Duration::from_secs(60));
        q.loaded(&[(addr(1), 0)]);
        let mut slots = granted(q.reserve(&[addr(1)]));
        let copy = copy();
        slots[0].bind(&copy);
        q.committed(&[stored(&copy)]);
        // Stored, no longer reserved, though its sender still holds the
        // slot: there is room for one more.
        assert_eq!(q.slots()[&addr(1)].stored, 1);
        assert_eq!(q.slots()[&addr(1)].reserved, 0);
        let other = granted(q.reserve(&[addr(1)]));
        assert!(matches!(q.reserve(&[addr(1)]), Reserve::Full));
        // Dropping the taken slot gives nothing back twice.
        drop(slots);
        assert!(matches!(q.reserve(&[addr(1)]), Reserve::Full));
        drop(other);
        assert_eq!(q.slots()[&addr(1)].reserved, 0);
        assert_eq!(q.slots()[&addr(1)].stored, 1);
    }

    #[test]
    fn a_bound_slot_dropped_before_any_commit_is_released_once() {
        let q = Quota::new(1, Duration::from_secs(60));
        q.loaded(&[(addr(1), 0)]);
        let mut slots = granted(q.reserve(&[addr(1)]));
        let copy = copy();
        slots[0].bind(&copy);
        drop(slots); // acknowledged live
        assert_eq!(q.slots()[&addr(1)].reserved, 0);
        // A later commit of the same copy (a spill after a late ack) counts
        // it stored, and takes no reservation it does not have.
        let held = granted(q.reserve(&[addr(1)]));
        q.committed(&[stored(&copy)]);
        assert_eq!(q.slots()[&addr(1)].reserved, 1);
        assert_eq!(q.slots()[&addr(1)].stored, 1);
        drop(held);
    }

    #[test]
    fn a_loaded_count_is_not_overwritten_until_it_is_stale() {
        let q = Quota::new(5, Duration::from_secs(60));
        q.loaded(&[(addr(1), 1)]);
        q.loaded(&[(addr(1), 4)]);
        let slots = granted(q.reserve(&[addr(1)]));
        assert_eq!(q.slots()[&addr(1)].stored, 1);
        drop(slots);
        let q = Quota::new(5, Duration::from_millis(50));
        q.loaded(&[(addr(1), 0)]);
        let held = granted(q.reserve(&[addr(1)]));
        std::thread::sleep(Duration::from_millis(60));
        // Stale: asked again, even while a slot is reserved.
        assert!(matches!(q.reserve(&[addr(1)]), Reserve::Unknown(_)));
        // Re-read: the count changes, the reservation stays.
        q.loaded(&[(addr(1), 4)]);
        assert_eq!(q.slots()[&addr(1)].stored, 4);
        assert_eq!(q.slots()[&addr(1)].reserved, 1);
        assert!(matches!(q.reserve(&[addr(1)]), Reserve::Full));
        drop(held);
    }

    fn refresh_of(r: Reserve) -> (Vec<Reserved>, Vec<Address>) {
        match r {
            Reserve::Granted { slots, refresh } => (slots, refresh),
            _ => panic!("expected granted"),
        }
    }

    #[test]
    fn a_count_past_half_its_ttl_is_granted_and_read_again_once() {
        let q = Quota::new(4, Duration::from_millis(100));
        q.loaded(&[(addr(1), 1), (addr(2), 1)]);
        let (_, refresh) = refresh_of(q.reserve(&[addr(1)]));
        assert!(refresh.is_empty(), "fresh counts are not read again");
        std::thread::sleep(Duration::from_millis(60));
        // Past half the ttl: still granted on the count it has, and asked
        // for once, however many sends find it so.
        let (first, refresh) = refresh_of(q.reserve(&[addr(1), addr(2)]));
        assert_eq!(first.len(), 2);
        assert_eq!(refresh, vec![addr(1), addr(2)]);
        let (_, again) = refresh_of(q.reserve(&[addr(1)]));
        assert!(
            again.is_empty(),
            "a re-read under way is not asked for twice"
        );
        // The re-read comes back within the ttl and is taken (a count not
        // asked for would be kept), reservations kept.
        q.loaded(&[(addr(1), 3)]);
        assert_eq!(q.slots()[&addr(1)].stored, 3);
        assert_eq!(q.slots()[&addr(1)].reserved, 1);
        assert!(matches!(q.reserve(&[addr(1)]), Reserve::Full));
        let (_, refresh) = refresh_of(q.reserve(&[addr(2)]));
        assert!(refresh.is_empty(), "device 2's re-read is still under way");
    }

    #[test]
    fn a_refresh_that_never_comes_back_expires_as_before() {
        let q = Quota::new(5, Duration::from_millis(50));
        q.loaded(&[(addr(1), 0)]);
        std::thread::sleep(Duration::from_millis(30));
        let (_, refresh) = refresh_of(q.reserve(&[addr(1)]));
        assert_eq!(refresh, vec![addr(1)]);
        std::thread::sleep(Duration::from_millis(30));
        assert!(matches!(q.reserve(&[addr(1)]), Reserve::Unknown(_)));
        q.loaded(&[(addr(1), 2)]);
        let (_, refresh) = refresh_of(q.reserve(&[addr(1)]));
        assert!(refresh.is_empty());
        assert_eq!(q.slots()[&addr(1)].stored, 2);
    }

    #[test]
    fn forgets_deleted_devices() {
        let q = Quota::new(5, Duration::from_secs(60));
        q.loaded(&[(addr(1), 3), (addr(2), 3)]);
        q.forget(AccountId(uuid::Uuid::nil()), Some(DeviceId(1)));
        assert!(matches!(q.reserve(&[addr(1)]), Reserve::Unknown(_)));
        assert!(matches!(q.reserve(&[addr(2)]), Reserve::Granted { .. }));
    }
}
