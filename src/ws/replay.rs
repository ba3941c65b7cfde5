//! The mailbox replay of a `DeviceSession`: page by page, never more than
//! the held-copy bound ahead of the device's acks, then `queue-empty`, then
//! the live copies that arrived meanwhile.
//!
//! A live session may also be asked to read its mailbox again (a rescan):
//! in a cluster, a copy can be stored while its device is connected, by a
//! node that could not reach it in time. The rescan reads the same way,
//! pushes only what the session does not hold already, and sends no second
//! `queue-empty` (there is exactly one per connection).

use actix::{ActorFutureExt, AsyncContext, Context, WrapFuture};

use super::session::{close_code, DeviceSession, Phase};
use crate::error::ApiError;
use crate::store;
use crate::wire::{self, ServerFrame};

/// Mailbox rows read per page. A page holds at most this many copies of
/// at most 256 KiB in memory at once.
const REPLAY_PAGE: usize = 32;

impl DeviceSession {
    /// Reads and pushes the next page, unless one is being read or the
    /// device holds as many unacknowledged copies as it may (then an ack,
    /// or an expired live copy, resumes it).
    pub(super) fn replay_page(&mut self, ctx: &mut Context<Self>) {
        if self.loading || !self.reading() || !self.held.can_replay() {
            return;
        }
        let limit = REPLAY_PAGE.min(self.held.replay_room()).max(1);
        self.loading = true;
        let pool = self.state.pool.clone();
        let dest = self.address;
        let after = self.cursor.clone();
        let keys = self.state.storage_keys.clone();
        let load = async move {
            store::blocking(&pool, move |conn| {
                store::mailbox::load_page(
                    conn,
                    dest,
                    after.as_deref(),
                    limit as i64,
                    keys.as_deref(),
                )
                .map_err(ApiError::from)
            })
            .await
        };
        ctx.spawn(load.into_actor(self).map(move |page, act, ctx| {
            act.loading = false;
            if !act.reading() {
                return;
            }
            let page = match page {
                Ok(page) => page,
                Err(_) => {
                    // Storage is failing: close so the client reconnects and retries.
                    log::error!("{}: cannot read mailbox; closing", act.address);
                    act.close(close_code::SERVER_ERROR, "mailbox unavailable", ctx);
                    return;
                }
            };
            let last_page = page.rows < limit;
            let mut whole = true;
            for envelope in page.envelopes {
                let bytes = envelope.content.len();
                // A rescan finds what this connection already pushed, and
                // what the device already acknowledged: a copy stored by
                // another node's late fallback (the device got it live), or
                // a row whose deletion is not committed yet. Such a row is
                // deleted (again: deleting is idempotent), not pushed.
                let acked = act
                    .recent_acks
                    .as_ref()
                    .is_some_and(|r| r.contains(envelope.guid));
                let held = act.held.holds(envelope.guid);
                if acked {
                    drop(act.state.writer.delete(act.address, envelope.guid));
                } else if held && act.rescanning {
                    if let Some(recent) = act.recent_acks.as_mut() {
                        recent.stored_too(envelope.guid);
                    }
                } else if !held {
                    if !act.held.has_room(bytes) {
                        whole = false;
                        break;
                    }
                    act.push(&envelope, ctx);
                    act.held.push_stored(envelope.guid, bytes);
                }
                act.cursor = Some(envelope.guid.hyphenated().to_string());
            }
            if !act.reading() {
                return;
            }
            if whole {
                // Past unreadable rows too: the page's own last row.
                act.cursor = page.cursor.or(act.cursor.take());
                if last_page {
                    return act.finish_reading(ctx);
                }
            }
            act.replay_page(ctx);
        }));
    }

    /// Whether the mailbox is being read: the replay, or a rescan.
    fn reading(&self) -> bool {
        self.phase == Phase::Replaying || (self.phase == Phase::Live && self.rescanning)
    }

    /// Goes on with a paused replay or rescan, if there is room now.
    pub(super) fn resume_replay(&mut self, ctx: &mut Context<Self>) {
        if self.reading() {
            self.replay_page(ctx);
        }
    }

    /// Reads the mailbox again from its start (see the module's doc). Asked
    /// while the replay or a rescan is under way, it runs once that ends:
    /// the reading may already be past the copies it is about.
    pub(super) fn rescan(&mut self, ctx: &mut Context<Self>) {
        match self.phase {
            Phase::Live if !self.rescanning => {
                self.rescanning = true;
                self.cursor = None;
                self.replay_page(ctx);
            }
            Phase::Starting => {}
            Phase::Replaying | Phase::Live => self.rescan_again = true,
            Phase::Closing => {}
        }
    }

    fn finish_reading(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Replaying {
            self.go_live(ctx);
        }
        self.rescanning = false;
        if std::mem::take(&mut self.rescan_again) {
            self.rescan(ctx);
        }
    }

    fn go_live(&mut self, ctx: &mut Context<Self>) {
        self.send_text(ServerFrame::QueueEmpty.to_text(), ctx);
        self.phase = Phase::Live;
        let outbox = &self.outbox;
        self.held.flush_buffered(|envelope| {
            outbox.text_with(|out| wire::write_message_frame(out, envelope))
        });
        self.check_unsent(ctx);
    }
}
