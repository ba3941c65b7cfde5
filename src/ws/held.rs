//! `Held`: what one connection holds for its device — pushed copies waiting
//! for acks, and live copies that arrived during the mailbox replay — with
//! the ack deadlines of the live ones. Bounded (SPEC, "Delivery guarantee"):
//! at most [`MAX_HELD_COPIES`] copies and [`MAX_HELD_BYTES`] of content; the
//! session spills a live copy at once, and pauses the replay, when full.
//!
//! A pushed mailbox copy is kept only as its guid and size: it is already
//! stored, and an ack deletes it by guid.
//!
//! A buffered copy whose ack deadline passes during the replay is spilled
//! (its sender is answered `queued` once it is committed) but stays in the
//! buffer, to be pushed after `queue-empty` in its place like the others:
//! it was never pushed, so this connection is its first chance, and pushing
//! it here keeps the order. The replay skips its stored row, if it gets to
//! it first; the device's ack deletes that row, as for any mailbox copy.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use crate::actors::router::{Deliver, RouteReply};
use crate::domain::envelope::Envelope;
use crate::FastMap;

/// Copies one connection may hold unacknowledged.
pub const MAX_HELD_COPIES: usize = 1_000;
/// Content bytes one connection may hold unacknowledged.
pub const MAX_HELD_BYTES: usize = 16 * 1024 * 1024;

enum Pushed {
    /// Its sender waits for the ack (or the spill).
    Live {
        envelope: Arc<Envelope>,
        reply: RouteReply,
    },
    /// A mailbox copy: an ack deletes it from the mailbox.
    Stored { bytes: usize },
}

/// The last guids a connection acknowledged, kept (in a cluster) for the
/// mailbox rescan: a copy forwarded from another node can be stored there
/// too when its confirmation came late, and the device, which already has
/// it, must not get it again; nor must a rescan that reads a row whose
/// deletion by an ack is not yet committed push it again.
#[derive(Default)]
pub struct RecentAcks {
    order: VecDeque<Uuid>,
    set: HashSet<Uuid>,
    /// Live copies held here that a rescan found stored too: their ack
    /// deletes the stored copy.
    stored_too: HashSet<Uuid>,
}

impl RecentAcks {
    /// Guids remembered at most.
    const CAP: usize = 4_096;

    pub fn note(&mut self, guid: Uuid) {
        if self.set.insert(guid) {
            self.order.push_back(guid);
            if self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    pub fn contains(&self, guid: Uuid) -> bool {
        self.set.contains(&guid)
    }

    /// A rescan found `guid`, which this connection holds, in the mailbox.
    pub fn stored_too(&mut self, guid: Uuid) {
        // Entries of copies that expired instead of being acked are never
        // taken back; start over rather than grow.
        if self.stored_too.len() >= Self::CAP {
            self.stored_too.clear();
        }
        self.stored_too.insert(guid);
    }

    /// Whether the acknowledged `guid` must also be deleted from the mailbox.
    pub fn take_stored_too(&mut self, guid: Uuid) -> bool {
        self.stored_too.remove(&guid)
    }
}

/// What an ack found.
pub enum Acked {
    /// A live copy: answer its sender `delivered`.
    Live(RouteReply),
    /// A pushed mailbox copy, or nothing held: delete it from the mailbox.
    Elsewhere,
}

/// A live copy whose time is up, or that must be stored because the
/// connection ends.
pub type Spill = (Arc<Envelope>, RouteReply);

/// A live copy waiting for the replay to end.
struct Buffered {
    envelope: Arc<Envelope>,
    /// `None` once spilled: its sender has its answer, and it is a mailbox
    /// copy when pushed.
    reply: Option<RouteReply>,
}

#[derive(Default)]
pub struct Held {
    pushed: FastMap<Uuid, Pushed>,
    /// Live copies that arrived before `queue-empty`, in arrival order.
    buffered: VecDeque<Buffered>,
    /// How many of the first `buffered` copies were spilled (their
    /// deadlines passed; deadlines pass in arrival order).
    buffered_spilled: usize,
    /// Ack deadlines of live copies (pushed or buffered), in arrival order,
    /// so in deadline order. Entries of copies acked since are skipped.
    deadlines: VecDeque<(Instant, Uuid)>,
    count: usize,
    bytes: usize,
}

impl Held {
    /// Room for one more copy of `bytes`.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.count < MAX_HELD_COPIES && self.bytes + bytes <= MAX_HELD_BYTES
    }

    /// Room to push more of the mailbox.
    pub fn can_replay(&self) -> bool {
        self.count < MAX_HELD_COPIES && self.bytes < MAX_HELD_BYTES
    }

    /// Copies the replay may still push before the count bound.
    pub fn replay_room(&self) -> usize {
        MAX_HELD_COPIES.saturating_sub(self.count)
    }

    fn add(&mut self, bytes: usize) {
        self.count += 1;
        self.bytes += bytes;
    }

    fn remove(&mut self, bytes: usize) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// A live copy was pushed; its sender waits until `deadline`.
    pub fn push_live(&mut self, d: Deliver, deadline: Instant) {
        let guid = d.envelope.guid;
        self.add(d.envelope.content.len());
        self.deadlines.push_back((deadline, guid));
        self.pushed.insert(
            guid,
            Pushed::Live {
                envelope: d.envelope,
                reply: d.reply,
            },
        );
    }

    /// A live copy waits for the replay to end; its sender waits until `deadline`.
    pub fn buffer(&mut self, d: Deliver, deadline: Instant) {
        self.add(d.envelope.content.len());
        self.deadlines.push_back((deadline, d.envelope.guid));
        self.buffered.push_back(Buffered {
            envelope: d.envelope,
            reply: Some(d.reply),
        });
    }

    /// Whether the copy `guid` was pushed and waits for its ack, or waits
    /// to be pushed.
    pub fn holds(&self, guid: Uuid) -> bool {
        self.pushed.contains_key(&guid) || self.buffered.iter().any(|b| b.envelope.guid == guid)
    }

    /// A mailbox copy was pushed.
    pub fn push_stored(&mut self, guid: Uuid, bytes: usize) {
        if !self.pushed.contains_key(&guid) {
            self.add(bytes);
            self.pushed.insert(guid, Pushed::Stored { bytes });
        }
    }

    /// Pushes (with `push`) every buffered copy, in order; live ones keep
    /// their deadlines, spilled ones are mailbox copies from now on.
    pub fn flush_buffered(&mut self, mut push: impl FnMut(&Envelope)) {
        self.buffered_spilled = 0;
        for b in std::mem::take(&mut self.buffered) {
            push(&b.envelope);
            let pushed = match b.reply {
                Some(reply) => Pushed::Live {
                    envelope: b.envelope.clone(),
                    reply,
                },
                None => Pushed::Stored {
                    bytes: b.envelope.content.len(),
                },
            };
            self.pushed.insert(b.envelope.guid, pushed);
        }
    }

    pub fn ack(&mut self, guid: Uuid) -> Acked {
        match self.pushed.remove(&guid) {
            Some(Pushed::Live { envelope, reply }) => {
                self.remove(envelope.content.len());
                Acked::Live(reply)
            }
            Some(Pushed::Stored { bytes }) => {
                self.remove(bytes);
                Acked::Elsewhere
            }
            None => Acked::Elsewhere,
        }
    }

    /// Takes the live copies whose deadline is before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Spill> {
        let mut out = Vec::new();
        while let Some(&(deadline, guid)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(Pushed::Live { .. }) = self.pushed.get(&guid) {
                if let Some(Pushed::Live { envelope, reply }) = self.pushed.remove(&guid) {
                    self.remove(envelope.content.len());
                    out.push((envelope, reply));
                }
            } else if let Some(b) = self
                .buffered
                .get_mut(self.buffered_spilled)
                .filter(|b| b.envelope.guid == guid)
            {
                // Buffered copies arrived in deadline order too, so an
                // expired one is always the first not yet spilled. It stays
                // buffered (see the module's doc), and counted.
                if let Some(reply) = b.reply.take() {
                    out.push((b.envelope.clone(), reply));
                }
                self.buffered_spilled += 1;
            }
        }
        out
    }

    /// The earliest ack deadline still queued.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|&(d, _)| d)
    }

    /// Takes every live copy (pushed or buffered) in acceptance order, and
    /// forgets the rest: the connection is ending.
    pub fn take_live(&mut self) -> Vec<Spill> {
        let mut live: Vec<Spill> = self
            .pushed
            .drain()
            .filter_map(|(_, p)| match p {
                Pushed::Live { envelope, reply } => Some((envelope, reply)),
                Pushed::Stored { .. } => None,
            })
            .collect();
        // Spilled buffered copies are in the mailbox already.
        live.extend(
            self.buffered
                .drain(..)
                .filter_map(|b| Some((b.envelope, b.reply?))),
        );
        self.buffered_spilled = 0;
        // Guids are UUIDv7: sorting keeps acceptance order in the mailbox.
        live.sort_by_key(|(e, _)| e.guid);
        self.deadlines.clear();
        self.count = 0;
        self.bytes = 0;
        live
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::RecentAcks;

    #[test]
    fn recent_acks_remember_the_last_ones_only() {
        let mut recent = RecentAcks::default();
        let guids: Vec<Uuid> = (0..RecentAcks::CAP + 10).map(|_| Uuid::now_v7()).collect();
        for g in &guids {
            recent.note(*g);
        }
        assert!(!recent.contains(guids[0]));
        assert!(!recent.contains(guids[9]));
        assert!(recent.contains(guids[10]));
        assert!(recent.contains(*guids.last().unwrap()));
        recent.stored_too(guids[3]);
        assert!(recent.take_stored_too(guids[3]));
        assert!(!recent.take_stored_too(guids[3]));
    }

    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::domain::address::{AccountId, Address, DeviceId};
    use crate::domain::envelope::new_guid;

    fn deliver(bytes: usize) -> Deliver {
        let (reply, _) = oneshot::channel();
        Deliver {
            envelope: Arc::new(Envelope {
                guid: new_guid(),
                source: Some(Address::new(AccountId(Uuid::nil()), DeviceId(1))),
                msg_type: 1,
                timestamp: 0,
                server_timestamp: 0,
                content: vec![0; bytes].into(),
                slot: Default::default(),
            }),
            ephemeral: false,
            reply,
        }
    }

    #[test]
    fn bounds_copies_and_bytes() {
        let mut held = Held::default();
        let later = Instant::now() + Duration::from_secs(60);
        for _ in 0..MAX_HELD_COPIES - 1 {
            held.push_live(deliver(1), later);
        }
        assert!(held.has_room(1));
        held.push_stored(new_guid(), 1);
        assert!(!held.has_room(1));
        assert!(!held.can_replay());

        let mut held = Held::default();
        held.push_live(deliver(MAX_HELD_BYTES - 10), later);
        assert!(held.has_room(10));
        assert!(!held.has_room(11));
    }

    #[test]
    fn an_ack_frees_room_and_finds_live_copies() {
        let mut held = Held::default();
        let d = deliver(5);
        let guid = d.envelope.guid;
        held.push_live(d, Instant::now() + Duration::from_secs(60));
        let stored = new_guid();
        held.push_stored(stored, 7);
        assert_eq!(held.len(), 2);
        assert!(matches!(held.ack(guid), Acked::Live(_)));
        assert!(matches!(held.ack(stored), Acked::Elsewhere));
        assert!(matches!(held.ack(new_guid()), Acked::Elsewhere));
        assert!(held.is_empty());
    }

    #[test]
    fn expires_pushed_and_buffered_copies_in_order() {
        let mut held = Held::default();
        let now = Instant::now();
        let a = deliver(1);
        let b = deliver(1);
        let c = deliver(1);
        let (ga, gb, gc) = (a.envelope.guid, b.envelope.guid, c.envelope.guid);
        held.push_live(a, now);
        held.buffer(b, now + Duration::from_millis(1));
        held.buffer(c, now + Duration::from_secs(60));
        let expired = held.expire(now + Duration::from_millis(2));
        let guids: Vec<Uuid> = expired.iter().map(|(e, _)| e.guid).collect();
        assert_eq!(guids, vec![ga, gb]);
        // The spilled buffered copy is still held, to be pushed in its place.
        assert_eq!(held.len(), 2);
        assert!(held.holds(gb));
        assert!(held.expire(now + Duration::from_millis(3)).is_empty());
        let mut pushed = Vec::new();
        held.flush_buffered(|e| pushed.push(e.guid));
        assert_eq!(pushed, vec![gb, gc]);
        // Pushed now as the mailbox copy it is: its ack deletes the row.
        assert!(matches!(held.ack(gb), Acked::Elsewhere));
        assert_eq!(held.len(), 1);
        assert_eq!(held.take_live().len(), 1);
        assert!(held.is_empty());
    }

    #[test]
    fn a_spilled_buffered_copy_is_not_spilled_again_when_the_connection_ends() {
        let mut held = Held::default();
        let now = Instant::now();
        let (a, b) = (deliver(1), deliver(1));
        let gb = b.envelope.guid;
        held.buffer(a, now);
        held.buffer(b, now + Duration::from_secs(60));
        assert_eq!(held.expire(now + Duration::from_millis(1)).len(), 1);
        let live: Vec<Uuid> = held.take_live().iter().map(|(e, _)| e.guid).collect();
        assert_eq!(live, vec![gb]);
        assert!(held.is_empty());
    }

    #[test]
    fn an_acked_copy_is_not_expired() {
        let mut held = Held::default();
        let now = Instant::now();
        let d = deliver(1);
        let guid = d.envelope.guid;
        held.push_live(d, now);
        held.ack(guid);
        assert!(held.expire(now + Duration::from_secs(1)).is_empty());
        assert_eq!(held.next_deadline(), None);
    }
}
