//! The mailbox replay of a `DeviceSession`: page by page, never more than
//! the held-copy bound ahead of the device's acks, then `queue-empty`, then
//! the live copies that arrived meanwhile.

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
        if self.loading || self.phase != Phase::Replaying || !self.held.can_replay() {
            return;
        }
        let limit = REPLAY_PAGE.min(self.held.replay_room()).max(1);
        self.loading = true;
        let pool = self.state.pool.clone();
        let dest = self.address;
        let after = self.cursor.clone();
        let load = async move {
            store::blocking(&pool, move |conn| {
                store::mailbox::load_page(conn, dest, after.as_deref(), limit as i64)
                    .map_err(ApiError::from)
            })
            .await
        };
        ctx.spawn(load.into_actor(self).map(move |page, act, ctx| {
            act.loading = false;
            if act.phase != Phase::Replaying {
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
                if !act.held.has_room(bytes) {
                    whole = false;
                    break;
                }
                act.push(&envelope, ctx);
                act.held.push_stored(envelope.guid, bytes);
                act.cursor = Some(envelope.guid.hyphenated().to_string());
            }
            if act.phase != Phase::Replaying {
                return;
            }
            if whole {
                // Past unreadable rows too: the page's own last row.
                act.cursor = page.cursor.or(act.cursor.take());
                if last_page {
                    return act.go_live(ctx);
                }
            }
            act.replay_page(ctx);
        }));
    }

    /// Goes on with a paused replay, if there is room now.
    pub(super) fn resume_replay(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Replaying {
            self.replay_page(ctx);
        }
    }

    fn go_live(&mut self, ctx: &mut Context<Self>) {
        self.send_text(ServerFrame::QueueEmpty.to_text(), ctx);
        self.phase = Phase::Live;
        let mut frames = Vec::new();
        self.held
            .flush_buffered(|envelope| frames.push(wire::message_frame(envelope)));
        for frame in frames {
            self.send_text(frame, ctx);
        }
    }
}
