//! `DeviceSession`: one actor per connected device.
//!
//! It pushes copies, tracks every copy it pushed until the device
//! acknowledges it ([`Held`]), and keeps the heartbeat. A live copy that is
//! not acknowledged within the ack timeout, or is still unacknowledged when
//! the connection ends, is spilled to the mailbox and its sender is answered
//! `queued` once the spill is committed.
//!
//! The actor runs on its own, not inside whatever writes its output (see
//! [`super::transport`]): a peer that stops reading cannot stop its timers,
//! and it is cut off once its unsent output passes [`MAX_UNSENT_BYTES`] or
//! makes no progress for [`CLIENT_TIMEOUT`].
//!
//! Order per (source → this device) is kept by phases: the session reads the
//! mailbox only after the router's barrier and the replaced session's spills
//! have settled, pushes it page by page, sends `queue-empty`, and only then
//! pushes the live copies it buffered meanwhile. Frame handling is in
//! [`super::frames`], the replay in [`super::replay`].

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Running, SpawnHandle,
    WeakAddr, WrapFuture,
};
use actix_http::ws::{CloseCode, CloseReason};
use tokio::sync::oneshot;

use super::gate::InflightGate;
use super::held::{Acked, Held, RecentAcks};
use super::sends::{close_once_answered, Sends};
use super::transport::{finish_or_cut, Outbox};
use crate::actors::router::{
    AckLive, Close, Connect, Deliver, Disconnect, Rescan, RouteReply, SessionHandle,
};
use crate::clock::Tick;
use crate::domain::address::Address;
use crate::domain::envelope::Envelope;
use crate::error::ApiError;
use crate::service::state::State;
use crate::store;
use crate::wire::{self, DeliveryStatus};

/// How often the server pings.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// A connection silent for this long is dropped; so is one whose output
/// made no progress for this long.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Output queued for a peer that does not read, past which the connection
/// is cut. Above what the held-copy bound lets through (16 MiB of content
/// is ~22 MiB of base64 frames) plus answers to in-flight sends.
pub const MAX_UNSENT_BYTES: usize = 32 * 1024 * 1024;
/// After a close, how long the close frame (and what precedes it) may take
/// to drain before the connection is reset.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Close codes (RFC 6455 and courier's own, as in Signal-Server).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A kind of frame the endpoint does not take (a rendezvous side's text).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const SERVER_ERROR: u16 = 1011;
    /// The device or its account was deleted.
    pub const REMOVED: u16 = 4401;
    /// A newer connection of the same device took over.
    pub const REPLACED: u16 = 4409;
}

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for earlier spills to settle before reading the mailbox.
    Starting,
    /// Pushing the stored mailbox.
    Replaying,
    /// `queue-empty` sent; copies are pushed as they come.
    Live,
    /// Spilled and closing; anything arriving now is spilled straight away.
    Closing,
}

pub struct DeviceSession {
    pub(super) id: u64,
    pub(super) address: Address,
    pub(super) state: State,
    pub(super) phase: Phase,
    /// When the peer last sent anything.
    pub(super) heartbeat: Tick,
    pub(super) sends: Sends,
    pub(super) outbox: Outbox,
    pub(super) held: Held,
    /// Where the replay goes on from (the last mailbox guid pushed).
    pub(super) cursor: Option<String>,
    /// A mailbox page is being read.
    pub(super) loading: bool,
    /// Live, and reading the mailbox again (see [`Rescan`]).
    pub(super) rescanning: bool,
    /// In a cluster: what this connection acknowledged lately.
    pub(super) recent_acks: Option<RecentAcks>,
    /// A rescan was asked for while the replay (or a rescan) was under way
    /// and may have passed the copies it is about.
    pub(super) rescan_again: bool,
    /// The ack-deadline timer, when one is armed.
    deadline_timer: Option<SpawnHandle>,
    /// Fired once this session has spilled what it holds (see `Connect`).
    settled: Option<oneshot::Sender<()>>,
    pub(super) bad_frames: u32,
    /// A text message arriving in fragments.
    pub(super) fragments: Option<Vec<u8>>,
    /// The rest of a refused fragmented message is skipped, so one bad
    /// message earns one error frame, not one per fragment.
    pub(super) skipping_fragments: bool,
    /// This session's own address, for its sends' answers (see
    /// [`super::frames::answer_into`]); made once.
    pub(super) me: Option<WeakAddr<Self>>,
}

impl DeviceSession {
    pub fn new(address: Address, state: State, gate: Rc<InflightGate>, outbox: Outbox) -> Self {
        let recent_acks = state.cluster.as_ref().map(|_| RecentAcks::default());
        DeviceSession {
            recent_acks,
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            address,
            state,
            phase: Phase::Starting,
            heartbeat: Tick::now(),
            sends: Sends::new(gate),
            outbox,
            held: Held::default(),
            cursor: None,
            loading: false,
            rescanning: false,
            rescan_again: false,
            deadline_timer: None,
            settled: None,
            bad_frames: 0,
            fragments: None,
            skipping_fragments: false,
            me: None,
        }
    }

    /// Queues a text frame; cuts the connection if the peer is not reading.
    pub(super) fn send_text(&mut self, text: String, ctx: &mut Context<Self>) {
        self.outbox.text(&text);
        self.check_unsent(ctx);
    }

    /// Cuts the connection if its unsent output passed [`MAX_UNSENT_BYTES`].
    pub(super) fn check_unsent(&mut self, ctx: &mut Context<Self>) {
        if self.outbox.unsent() > MAX_UNSENT_BYTES {
            log::info!(
                "{}: peer is not reading ({} bytes unsent); cutting the connection",
                self.address,
                self.outbox.unsent()
            );
            self.abort(ctx);
        }
    }

    pub(super) fn push(&mut self, envelope: &Envelope, ctx: &mut Context<Self>) {
        self.outbox
            .text_with(|out| wire::write_message_frame(out, envelope));
        self.check_unsent(ctx);
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.state.config.ack_timeout()
    }

    /// Pushes a live copy and starts its ack clock. An ephemeral copy is
    /// answered `delivered` once pushed: it is never stored, so nothing
    /// waits for its ack.
    fn push_live(&mut self, d: Deliver, ctx: &mut Context<Self>) {
        self.push(&d.envelope, ctx);
        if d.ephemeral {
            let _ = d.reply.send(Ok(DeliveryStatus::Delivered));
            return;
        }
        let deadline = self.deadline();
        self.held.push_live(d, deadline);
        self.arm_deadlines(ctx);
    }

    pub(super) fn spill_one(&self, envelope: Arc<Envelope>, reply: RouteReply) {
        self.state
            .writer
            .spill_answering(self.address, envelope, reply);
    }

    /// Spills every live copy this session holds, then fires `settled` once
    /// they are committed. Mailbox copies stay where they are. Idempotent.
    fn spill_all(&mut self) {
        for (envelope, reply) in self.held.take_live() {
            self.spill_one(envelope, reply);
        }
        if let Some(settled) = self.settled.take() {
            self.state.writer.barrier_then(Box::new(move |_| {
                let _ = settled.send(());
            }));
        }
    }

    /// Sends a close frame and stops; see `stopped` for a peer that never
    /// reads it.
    pub(super) fn close(&mut self, code: u16, why: &str, ctx: &mut Context<Self>) {
        self.phase = Phase::Closing;
        self.spill_all();
        self.outbox.close(Some(CloseReason {
            code: CloseCode::from(code),
            description: Some(why.to_owned()),
        }));
        ctx.stop();
    }

    /// At shutdown: spills what it holds at once, and closes with 1001 once
    /// its own sends in flight are answered (see [`close_once_answered`]).
    fn drain(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Closing;
        self.spill_all();
        close_once_answered(
            ctx,
            |act| &act.sends,
            |act, ctx| act.close(close_code::GOING_AWAY, "server is shutting down", ctx),
        );
    }

    /// Resets the connection at once (the peer is not reading) and stops.
    fn abort(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Closing;
        self.spill_all();
        self.outbox.cut();
        ctx.stop();
    }

    /// Arms the ack-deadline timer for the earliest deadline, if not armed.
    /// It fires a little late on purpose, to expire copies in batches.
    fn arm_deadlines(&mut self, ctx: &mut Context<Self>) {
        if self.deadline_timer.is_some() {
            return;
        }
        let Some(next) = self.held.next_deadline() else {
            return;
        };
        let slack = (self.state.config.ack_timeout() / 8)
            .clamp(Duration::from_millis(1), Duration::from_millis(100));
        let wait = next.saturating_duration_since(Instant::now()) + slack;
        self.deadline_timer = Some(ctx.run_later(wait, |act, ctx| {
            act.deadline_timer = None;
            act.expire_deadlines(ctx);
        }));
    }

    /// Spills live copies whose ack deadline passed. The device may still ack
    /// them: the ack then deletes the mailbox copy.
    fn expire_deadlines(&mut self, ctx: &mut Context<Self>) {
        for (envelope, reply) in self.held.expire(Instant::now()) {
            self.spill_one(envelope, reply);
        }
        self.arm_deadlines(ctx);
        self.resume_replay(ctx);
    }

    /// An ack from the device, by frame or by HTTP (`by_http`: the caller
    /// deletes from the mailbox itself). `true` if it was a live copy this
    /// session held.
    pub(super) fn on_ack(
        &mut self,
        guid: uuid::Uuid,
        by_http: bool,
        ctx: &mut Context<Self>,
    ) -> bool {
        self.bad_frames = 0;
        let mut stored_too = false;
        if let Some(recent) = self.recent_acks.as_mut() {
            recent.note(guid);
            stored_too = recent.take_stored_too(guid);
        }
        let live = match self.held.ack(guid) {
            Acked::Live(reply) => {
                // A live copy acknowledged in time: it never touches storage
                // (unless another node stored it too, see `RecentAcks`).
                if stored_too {
                    drop(self.state.writer.delete(self.address, guid));
                }
                self.state.metrics.messages_delivered_live.inc();
                let _ = reply.send(Ok(DeliveryStatus::Delivered));
                true
            }
            // A mailbox copy, or a live copy already spilled on timeout.
            Acked::Elsewhere => {
                if !by_http {
                    drop(self.state.writer.delete(self.address, guid));
                }
                false
            }
        };
        self.resume_replay(ctx);
        live
    }

    /// Pings every interval; drops a silent peer, or one whose output has
    /// not moved, after [`CLIENT_TIMEOUT`].
    fn keep_alive(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, ctx| {
            if act.outbox.stalled_for() >= CLIENT_TIMEOUT {
                log::info!("{}: no write progress; cutting the connection", act.address);
                act.abort(ctx);
                return;
            }
            act.outbox.ping();
        });
        self.watch_silence(ctx, CLIENT_TIMEOUT);
    }

    /// Checks for silence exactly when the peer would have been silent for
    /// [`CLIENT_TIMEOUT`], then again as late as the last frame allows.
    fn watch_silence(&mut self, ctx: &mut Context<Self>, after: Duration) {
        ctx.run_later(after, |act, ctx| {
            let silent = act.heartbeat.elapsed();
            if silent >= CLIENT_TIMEOUT {
                log::info!("{}: heartbeat timed out", act.address);
                act.abort(ctx);
            } else {
                act.watch_silence(ctx, CLIENT_TIMEOUT - silent);
            }
        });
    }

    fn session_handle(ctx: &mut Context<Self>) -> SessionHandle {
        let addr = ctx.address();
        SessionHandle {
            deliver: addr.clone().recipient(),
            close: addr.clone().recipient(),
            ack: addr.clone().recipient(),
            rescan: addr.recipient(),
        }
    }
}

impl Actor for DeviceSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.keep_alive(ctx);
        let (settled_tx, settled_rx) = oneshot::channel();
        self.settled = Some(settled_tx);
        let connect = self.state.router.send(Connect {
            address: self.address,
            id: self.id,
            session: Self::session_handle(ctx),
            settled: settled_rx,
        });
        let pool = self.state.pool.clone();
        let address = self.address;
        let registered = async move {
            let settled = match connect.await {
                Ok(Some(settled)) => settled,
                _ => return Err(close_code::GOING_AWAY),
            };
            settled.await;
            // Deleted between authentication and registration? The delete's
            // `CloseDevices` may have reached the router before our `Connect`.
            let exists = store::blocking(&pool, move |conn| {
                store::accounts::find_secret(conn, address).map_err(ApiError::from)
            })
            .await;
            match exists {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(close_code::REMOVED),
                Err(_) => Err(close_code::SERVER_ERROR),
            }
        };
        ctx.spawn(
            registered
                .into_actor(self)
                .map(|registered, act, ctx| match registered {
                    Ok(()) if act.phase == Phase::Starting => {
                        act.phase = Phase::Replaying;
                        act.replay_page(ctx);
                    }
                    Ok(()) => {}
                    Err(close_code::REMOVED) => {
                        act.close(close_code::REMOVED, "device removed", ctx)
                    }
                    Err(close_code::GOING_AWAY) => {
                        act.close(close_code::GOING_AWAY, "server is shutting down", ctx)
                    }
                    Err(code) => act.close(code, "storage unavailable", ctx),
                }),
        );
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.phase = Phase::Closing;
        self.spill_all();
        self.state.router.do_send(Disconnect {
            address: self.address,
            id: self.id,
        });
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        finish_or_cut(&self.outbox, CLOSE_GRACE);
    }
}

impl Handler<Deliver> for DeviceSession {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        let bytes = msg.envelope.content.len();
        match self.phase {
            Phase::Closing if msg.ephemeral => {
                let _ = msg.reply.send(Ok(DeliveryStatus::Dropped));
            }
            Phase::Closing => self.spill_one(msg.envelope, msg.reply),
            // Ephemeral copies have no order to keep and are never held.
            _ if msg.ephemeral => self.push_live(msg, ctx),
            // Full: the copy goes to the mailbox now, answered `queued`.
            _ if !self.held.has_room(bytes) => self.spill_one(msg.envelope, msg.reply),
            Phase::Live => self.push_live(msg, ctx),
            Phase::Replaying | Phase::Starting => {
                let deadline = self.deadline();
                self.held.buffer(msg, deadline);
                self.arm_deadlines(ctx);
            }
        }
    }
}

impl Handler<Close> for DeviceSession {
    type Result = ();

    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) {
        match msg {
            Close::Replaced => self.close(close_code::REPLACED, "connected elsewhere", ctx),
            Close::Removed => self.close(close_code::REMOVED, "device removed", ctx),
            Close::Draining => self.drain(ctx),
        }
    }
}

impl Handler<Rescan> for DeviceSession {
    type Result = ();

    fn handle(&mut self, _: Rescan, ctx: &mut Self::Context) {
        self.rescan(ctx);
    }
}

impl Handler<AckLive> for DeviceSession {
    type Result = bool;

    fn handle(&mut self, msg: AckLive, ctx: &mut Self::Context) -> bool {
        self.on_ack(msg.guid, true, ctx)
    }
}
