//! `DeviceSession`: one actor per connected device (WebSocket).
//!
//! It speaks the SPEC's frames, keeps the heartbeat, and tracks every copy it
//! pushed until the device acknowledges it. A live copy that is not
//! acknowledged within the ack timeout, or is still unacknowledged when the
//! connection ends, is spilled to the mailbox and its sender is answered
//! `queued` only once the spill is committed. All framing lives in this file,
//! so a move from actix-web-actors to actix-ws touches nothing else.
//!
//! Order per (source → this device) is kept by phases: the session reads the
//! mailbox only after the router's barrier and the replaced session's spills
//! have settled, pushes it page by page, sends `queue-empty`, and only then
//! pushes the live copies it buffered meanwhile.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Handler, Message, Running, StreamHandler,
    WrapFuture,
};
use actix_web::web::Bytes;
use actix_web_actors::ws;
use futures_util::Stream;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::router::{spill_status, Connect, Disconnect, RouteReply};
use crate::domain::address::Address;
use crate::domain::envelope::Envelope;
use crate::error::ApiError;
use crate::service::messaging;
use crate::state::State;
use crate::store;
use crate::wire::{self, ClientFrame, DeliveryStatus, ServerFrame};

/// How often the server pings.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// A connection silent for this long is dropped.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Mailbox copies read per page on connect.
const REPLAY_PAGE: i64 = 200;
/// Consecutive unusable frames tolerated before the connection is closed.
const MAX_BAD_FRAMES: u32 = 100;
/// Largest text frame (a send carries up to one 256 KiB copy per device).
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Close code for a device that connected again elsewhere (as Signal-Server).
const CLOSE_REPLACED: u16 = 4409;
/// Close code for a device or account that was deleted.
const CLOSE_REMOVED: u16 = 4401;

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// From the router: push one copy to the device.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub envelope: Arc<Envelope>,
    pub ephemeral: bool,
    pub reply: RouteReply,
}

/// From the router: close this session.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub enum Close {
    /// A newer connection of the same device took over (4409).
    Replaced,
    /// The device or its account was deleted (4401).
    Removed,
}

/// From the router at shutdown: spill everything and close with 1001.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for earlier spills to settle before reading the mailbox.
    Starting,
    /// Pushing the stored mailbox.
    Replaying,
    /// `queue-empty` sent; copies are pushed as they come.
    Live,
    /// Spilled and closing; anything arriving now is spilled straight away.
    Closing,
}

/// A pushed, unacknowledged copy.
struct Pending {
    envelope: Arc<Envelope>,
    /// `Some` for a live copy (its sender waits); `None` for a mailbox copy.
    reply: Option<RouteReply>,
}

/// How long a connection's frames go unread after one of its sends was
/// refused by the rate limit. Without it a client that ignores `429` keeps
/// the server answering refusals as fast as it can write them (~160,000 a
/// second on two cores in `courier-load flood`), and everyone else pays in
/// latency. Short enough that a well-behaved client's acks still arrive
/// long before its copies' ack timeout.
const RATE_LIMITED_PAUSE: Duration = Duration::from_millis(100);

/// Counts a connection's unanswered sends and pauses reading its frames
/// while the count is at the limit (SPEC: backpressure, not errors), or for
/// a moment after a rate-limited send.
pub struct InflightGate {
    count: Cell<usize>,
    max: usize,
    waker: RefCell<Option<Waker>>,
    paused_until: Cell<Option<Instant>>,
}

impl InflightGate {
    pub fn new(max: usize) -> Rc<Self> {
        Rc::new(InflightGate {
            count: Cell::new(0),
            max,
            waker: RefCell::new(None),
            paused_until: Cell::new(None),
        })
    }

    /// Stops reading frames for `d` from now (or longer, if already paused).
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        if self.paused_until.get().is_none_or(|t| t < until) {
            self.paused_until.set(Some(until));
        }
    }

    fn acquire(&self) {
        self.count.set(self.count.get() + 1);
    }

    fn release(&self) {
        self.count.set(self.count.get().saturating_sub(1));
        if self.count.get() < self.max {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

/// The request payload, read only while the gate is open.
pub struct GatedStream<S> {
    inner: S,
    gate: Rc<InflightGate>,
    /// The timer of a pause (see [`InflightGate::pause`]).
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> GatedStream<S> {
    pub fn new(inner: S, gate: Rc<InflightGate>) -> Self {
        GatedStream {
            inner,
            gate,
            sleep: None,
        }
    }
}

impl<S, E> Stream for GatedStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if let Some(until) = self.gate.paused_until.get() {
            let deadline = tokio::time::Instant::from_std(until);
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            if std::future::Future::poll(sleep.as_mut(), cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
            self.gate.paused_until.set(None);
        }
        if self.gate.count.get() >= self.gate.max {
            *self.gate.waker.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

pub struct DeviceSession {
    id: u64,
    address: Address,
    state: State,
    phase: Phase,
    heartbeat: Instant,
    gate: Rc<InflightGate>,
    /// Live copies that arrived before `queue-empty`, in arrival order.
    buffered: Vec<Deliver>,
    pending: HashMap<Uuid, Pending>,
    /// Ack deadlines of live copies, in push order (so in deadline order).
    deadlines: VecDeque<(Instant, Uuid)>,
    /// Completes when the previous send of this connection has been routed,
    /// so copies are routed in the order the frames arrived.
    last_routed: Option<oneshot::Receiver<()>>,
    /// Fired once this session has spilled what it holds (see `Connect`).
    settled: Option<oneshot::Sender<()>>,
    bad_frames: u32,
    /// A text message arriving in fragments.
    fragments: Option<Vec<u8>>,
    /// The rest of a refused fragmented message is skipped, so one bad
    /// message earns one error frame, not one per fragment.
    skipping_fragments: bool,
}

impl DeviceSession {
    pub fn new(address: Address, state: State, gate: Rc<InflightGate>) -> Self {
        DeviceSession {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            address,
            state,
            phase: Phase::Starting,
            heartbeat: Instant::now(),
            gate,
            buffered: Vec::new(),
            pending: HashMap::new(),
            deadlines: VecDeque::new(),
            last_routed: None,
            settled: None,
            bad_frames: 0,
            fragments: None,
            skipping_fragments: false,
        }
    }

    fn push(&mut self, envelope: &Envelope, ctx: &mut ws::WebsocketContext<Self>) {
        ctx.text(wire::message_frame(envelope));
    }

    /// Pushes a live copy and starts its ack clock.
    fn push_live(&mut self, d: Deliver, ctx: &mut ws::WebsocketContext<Self>) {
        self.push(&d.envelope, ctx);
        if d.ephemeral {
            let _ = d.reply.send(Ok(DeliveryStatus::Delivered));
            return;
        }
        let guid = d.envelope.guid;
        self.deadlines
            .push_back((Instant::now() + self.state.config.ack_timeout(), guid));
        self.pending.insert(
            guid,
            Pending {
                envelope: d.envelope,
                reply: Some(d.reply),
            },
        );
    }

    fn spill_one(&self, envelope: Arc<Envelope>, reply: RouteReply) {
        self.state.writer.spill_then(
            self.address,
            envelope,
            Box::new(move |r| {
                let _ = reply.send(spill_status(r));
            }),
        );
    }

    /// Spills every live copy this session holds (pushed-unacked and
    /// buffered), then fires `settled` once they are committed. Mailbox
    /// copies stay where they are. Idempotent.
    fn spill_all(&mut self) {
        let buffered = std::mem::take(&mut self.buffered);
        let mut live: Vec<(Arc<Envelope>, RouteReply)> = Vec::new();
        for (_, p) in self.pending.drain() {
            if let Some(reply) = p.reply {
                live.push((p.envelope, reply));
            }
        }
        // Keep acceptance order in the mailbox: guids are UUIDv7.
        live.sort_by_key(|(e, _)| e.guid);
        for (envelope, reply) in live {
            self.spill_one(envelope, reply);
        }
        for d in buffered {
            if d.ephemeral {
                self.state.metrics.messages_dropped.inc();
                let _ = d.reply.send(Ok(DeliveryStatus::Dropped));
            } else {
                self.spill_one(d.envelope, d.reply);
            }
        }
        self.deadlines.clear();
        if let Some(settled) = self.settled.take() {
            self.state.writer.barrier_then(Box::new(move |_| {
                let _ = settled.send(());
            }));
        }
    }

    fn close(&mut self, code: u16, why: &str, ctx: &mut ws::WebsocketContext<Self>) {
        self.phase = Phase::Closing;
        self.spill_all();
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(code),
            description: Some(why.to_owned()),
        }));
        ctx.stop();
    }

    /// Spills live copies whose ack deadline passed. The device may still ack
    /// them: the ack then deletes the mailbox copy.
    fn expire_deadlines(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, guid)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(Pending {
                envelope,
                reply: Some(reply),
            }) = self.pending.remove(&guid)
            {
                self.spill_one(envelope, reply);
            }
        }
    }

    fn replay_page(&mut self, after: Option<Uuid>, ctx: &mut ws::WebsocketContext<Self>) {
        let pool = self.state.pool.clone();
        let dest = self.address;
        let load = async move {
            store::blocking(&pool, move |conn| {
                store::mailbox::load_page(conn, dest, after, REPLAY_PAGE).map_err(ApiError::from)
            })
            .await
        };
        ctx.spawn(
            load.into_actor(self)
                .map(move |page: Result<_, ApiError>, act, ctx| {
                    if act.phase != Phase::Replaying {
                        return;
                    }
                    let page = match page {
                        Ok(page) => page,
                        Err(_) => {
                            // Storage is failing: close so the client reconnects and retries.
                            log::error!("{}: cannot read mailbox; closing", act.address);
                            act.close(1011, "mailbox unavailable", ctx);
                            return;
                        }
                    };
                    let full = page.len() as i64 == REPLAY_PAGE;
                    let last = page.last().map(|e| e.guid);
                    for envelope in page {
                        act.push(&envelope, ctx);
                        act.pending.insert(
                            envelope.guid,
                            Pending {
                                envelope: Arc::new(envelope),
                                reply: None,
                            },
                        );
                    }
                    if full {
                        act.replay_page(last.or(after), ctx);
                    } else {
                        act.go_live(ctx);
                    }
                }),
        );
    }

    fn go_live(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        ctx.text(ServerFrame::QueueEmpty.to_text());
        self.phase = Phase::Live;
        for d in std::mem::take(&mut self.buffered) {
            self.push_live(d, ctx);
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        match wire::parse_client_frame(text) {
            ClientFrame::Send {
                id,
                destination,
                body,
            } => self.on_send(id, destination, body, ctx),
            ClientFrame::InvalidSend { id, reason } => {
                self.bad_frames = 0;
                ctx.text(response_frame(&id, Err(ApiError::BadRequest(reason))));
            }
            ClientFrame::Ack { guid } => self.on_ack(guid),
            ClientFrame::Unusable(why) => self.bad_frame(why, ctx),
        }
    }

    fn bad_frame(&mut self, message: &str, ctx: &mut ws::WebsocketContext<Self>) {
        self.bad_frames += 1;
        ctx.text(ServerFrame::Error { message }.to_text());
        if self.bad_frames > MAX_BAD_FRAMES {
            log::info!("{}: too many unusable frames; closing", self.address);
            self.close(1008, "too many unusable frames", ctx);
        }
    }

    fn on_ack(&mut self, guid: Uuid) {
        self.bad_frames = 0;
        match self.pending.remove(&guid) {
            Some(Pending {
                reply: Some(reply), ..
            }) => {
                // A live copy acknowledged in time: it never touches storage.
                self.state.metrics.messages_delivered_live.inc();
                let _ = reply.send(Ok(DeliveryStatus::Delivered));
            }
            // A mailbox copy, or a live copy already spilled on timeout.
            _ => {
                drop(self.state.writer.delete(self.address, guid));
            }
        }
    }

    fn on_send(
        &mut self,
        id: serde_json::Number,
        destination: String,
        body: wire::SendRequest,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        self.bad_frames = 0;
        self.gate.acquire();
        let state = self.state.clone();
        let sender = self.address;
        let previous = self.last_routed.take();
        let (routed_tx, routed_rx) = oneshot::channel();
        self.last_routed = Some(routed_rx);
        let work = async move {
            let prepared = messaging::prepare(&state, sender, &destination, body).await;
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            match prepared {
                Ok(prepared) => {
                    let answer = messaging::route(&state, prepared);
                    let _ = routed_tx.send(());
                    answer.await
                }
                Err(e) => {
                    let _ = routed_tx.send(());
                    Err(e)
                }
            }
        };
        // A task of its own, not `ctx.spawn`: actix polls every future
        // spawned on a context each time the actor wakes, so with hundreds
        // of sends in flight per connection every frame cost hundreds of
        // polls, and past saturation the session spent its time polling
        // (relay throughput collapsed to a fifth). A task is woken alone;
        // it runs on this arbiter's thread and hands the answer back as a
        // message. The gate is released here even if the session has gone.
        let gate = self.gate.clone();
        let session = ctx.address();
        actix::spawn(async move {
            let result = work.await;
            if let Err(ApiError::RateLimited { .. }) = result {
                gate.pause(RATE_LIMITED_PAUSE);
            }
            gate.release();
            session.do_send(Answered { id, result });
        });
    }
}

/// A send's answer, back from its task (see [`DeviceSession::on_send`]).
#[derive(Message)]
#[rtype(result = "()")]
struct Answered {
    id: serde_json::Number,
    result: Result<wire::SendResponse, ApiError>,
}

impl Handler<Answered> for DeviceSession {
    type Result = ();

    fn handle(&mut self, msg: Answered, ctx: &mut Self::Context) {
        ctx.text(response_frame(&msg.id, msg.result));
    }
}

fn response_frame(id: &serde_json::Number, result: Result<wire::SendResponse, ApiError>) -> String {
    match result {
        Ok(r) => wire::response_frame(id, 200, &r),
        Err(e) => wire::response_frame(id, e.status().as_u16(), &e.body()),
    }
}

impl Actor for DeviceSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, ctx| {
            if act.heartbeat.elapsed() > CLIENT_TIMEOUT {
                log::info!("{}: heartbeat timed out", act.address);
                ctx.stop();
                return;
            }
            ctx.ping(b"");
        });
        let tick = (self.state.config.ack_timeout() / 4)
            .clamp(Duration::from_millis(5), Duration::from_millis(250));
        ctx.run_interval(tick, |act, _| act.expire_deadlines());

        let (settled_tx, settled_rx) = oneshot::channel();
        self.settled = Some(settled_tx);
        let connect = self.state.router.send(Connect {
            address: self.address,
            id: self.id,
            session: ctx.address(),
            settled: settled_rx,
        });
        let registered = async move {
            match connect.await {
                Ok(Some(settled)) => {
                    settled.await;
                    true
                }
                _ => false,
            }
        };
        ctx.spawn(registered.into_actor(self).map(|registered, act, ctx| {
            if !registered {
                act.close(1001, "server is shutting down", ctx);
                return;
            }
            if act.phase == Phase::Starting {
                act.phase = Phase::Replaying;
                act.replay_page(None, ctx);
            }
        }));
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
}

impl Handler<Deliver> for DeviceSession {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        match self.phase {
            Phase::Live => self.push_live(msg, ctx),
            // Ephemeral copies have no order to keep: push them at once.
            Phase::Replaying | Phase::Starting if msg.ephemeral => self.push_live(msg, ctx),
            Phase::Replaying | Phase::Starting => self.buffered.push(msg),
            Phase::Closing if msg.ephemeral => {
                let _ = msg.reply.send(Ok(DeliveryStatus::Dropped));
            }
            Phase::Closing => self.spill_one(msg.envelope, msg.reply),
        }
    }
}

impl Handler<Close> for DeviceSession {
    type Result = ();

    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) {
        match msg {
            Close::Replaced => self.close(CLOSE_REPLACED, "connected elsewhere", ctx),
            Close::Removed => self.close(CLOSE_REMOVED, "device removed", ctx),
        }
    }
}

impl Handler<Drain> for DeviceSession {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Self::Context) {
        self.close(1001, "server is shutting down", ctx);
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for DeviceSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.heartbeat = Instant::now();
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                log::debug!("{}: protocol error: {e}", self.address);
                self.close(1002, "protocol error", ctx);
                return;
            }
        };
        match msg {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Ping(p) => ctx.pong(&p),
            ws::Message::Pong(_) => {}
            ws::Message::Binary(_) => self.bad_frame("frames are JSON text", ctx),
            ws::Message::Continuation(item) => self.on_fragment(item, ctx),
            // Answer the close handshake (RFC 6455 §5.5.1) before stopping.
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
            ws::Message::Nop => {}
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl DeviceSession {
    /// Reassembles a fragmented text message (bounded by `MAX_FRAME_BYTES`).
    fn on_fragment(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        let last = matches!(item, actix_http::ws::Item::Last(_));
        match item {
            actix_http::ws::Item::FirstText(b) => {
                self.skipping_fragments = false;
                self.fragments = Some(b.to_vec());
            }
            actix_http::ws::Item::FirstBinary(_) => {
                self.fragments = None;
                self.skipping_fragments = !last;
                self.bad_frame("frames are JSON text", ctx);
            }
            actix_http::ws::Item::Continue(_) | actix_http::ws::Item::Last(_)
                if self.skipping_fragments =>
            {
                self.skipping_fragments = !last;
            }
            actix_http::ws::Item::Continue(b) | actix_http::ws::Item::Last(b) => {
                let Some(buf) = self.fragments.as_mut() else {
                    return self.bad_frame("continuation without a first fragment", ctx);
                };
                if buf.len() + b.len() > MAX_FRAME_BYTES {
                    self.fragments = None;
                    self.skipping_fragments = !last;
                    return self.bad_frame("message too large", ctx);
                }
                buf.extend_from_slice(&b);
                if last {
                    let buf = self.fragments.take().unwrap_or_default();
                    match std::str::from_utf8(&buf) {
                        Ok(text) => self.on_text(text, ctx),
                        Err(_) => self.bad_frame("text frame is not UTF-8", ctx),
                    }
                }
            }
        }
    }
}
