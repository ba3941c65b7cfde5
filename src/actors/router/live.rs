//! `Live`: which session holds each connected device, readable from every
//! thread, so a send hands its copy straight to the recipient's session
//! instead of through the router actor.
//!
//! Through the router, each copy crossed threads twice (the sender's worker
//! to the router's arbiter, then to the recipient's worker), and the kernel
//! switching those threads was the largest single cost of a relayed
//! message. The router still decides who is connected: it is the only
//! writer here, and changes this map in the same critical section as the
//! messages that go with the change, which is what keeps the router's
//! guarantees with a copy that bypasses it:
//!
//! - **Replacement.** The router swaps the entry and sends the old session
//!   `Close` under the write lock; a sender looks up and sends `Deliver`
//!   under the read lock. So every copy handed to the old session is in its
//!   queue before its `Close`, and it spills it before it settles (which the
//!   new session waits for), exactly as when the router sent both.
//! - **Absent devices.** A sender that finds no session hands the copy to
//!   the mailbox writer while it still holds the read lock, and the router
//!   takes the writer's barrier for a new session under the write lock. So
//!   a copy spilled because the device was away is committed before that
//!   device's next session reads its mailbox.
//! - **Order per sender.** A connection routes its sends one after another,
//!   and each copy is queued (to a session or to the writer) before the
//!   next is looked up, so two copies to one device never overtake.

use std::sync::{Arc, RwLock, RwLockWriteGuard};

use actix::Recipient;

use super::messages::Deliver;
use crate::domain::address::Address;
use crate::FastMap;

/// The connected devices' sessions (see the module comment).
#[derive(Clone, Default)]
pub struct Live(Arc<RwLock<FastMap<Address, Recipient<Deliver>>>>);

impl Live {
    /// Queues `copy` to `dest`'s session if it has one; otherwise calls
    /// `absent` with it, still under the lock, so that whatever `absent`
    /// queues is ordered before the device's next connection.
    pub fn deliver_or(&self, dest: Address, copy: Deliver, absent: impl FnOnce(Deliver)) {
        // A poisoned lock means a writer panicked mid-update of a plain
        // map: the map itself is still whole, so keep using it.
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        match map.get(&dest) {
            // A session that stopped meanwhile drops the copy unanswered,
            // and whoever routed it stores it.
            Some(session) => session.do_send(copy),
            None => absent(copy),
        }
    }

    /// The router's side: held while it changes who is connected and sends
    /// the messages that go with the change.
    pub(super) fn write(&self) -> RwLockWriteGuard<'_, FastMap<Address, Recipient<Deliver>>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}
