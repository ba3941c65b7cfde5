//! `SenderSession`: an unidentified WebSocket (an upgrade with no
//! credentials at all), over which clients send sealed-sender messages
//! without the server learning which device sends them.
//!
//! It only sends: it is registered nowhere, receives no messages and no
//! `queue-empty`, and each `send` frame must carry the destination's
//! `unidentifiedAccessKey`. Sends are routed in frame order and answered
//! with `response` frames, with the same backpressure, heartbeat and output
//! bound as a device's connection.

use std::net::IpAddr;
use std::rc::Rc;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, StreamHandler, WeakAddr};
use actix_http::ws::{Frame, Item, ProtocolError};

use super::frames::{answer_into, own_address, refusal_frame, Overflowed, MAX_FRAME_BYTES};
use super::gate::InflightGate;
use super::sends::{close_once_answered, Sends};
use super::session::MAX_UNSENT_BYTES;
use super::session::{close_code, CLIENT_TIMEOUT, CLOSE_GRACE, HEARTBEAT_INTERVAL};
use super::transport::{finish_or_cut, Outbox};
use crate::actors::router::Close;
use crate::clock::Tick;
use crate::domain::access::AccessKey;
use crate::error::ApiError;
use crate::http::auth::access_key;
use crate::service::messaging::SendAs;
use crate::service::state::State;
use crate::wire::{self, ClientFrame, ServerFrame, MAX_SEND_BYTES};

/// Consecutive unusable frames tolerated before the connection is closed.
const MAX_BAD_FRAMES: u32 = 100;

pub struct SenderSession {
    client: IpAddr,
    state: State,
    sends: Sends,
    outbox: Outbox,
    heartbeat: Tick,
    bad_frames: u32,
    /// A text message arriving in fragments; `None` while skipping one.
    fragments: Option<Vec<u8>>,
    /// This session's own address, for its sends' answers (see
    /// [`answer_into`]); made once.
    me: Option<WeakAddr<Self>>,
    /// Its entry in `state.unidentified`, once started.
    listed: Option<u64>,
}

impl SenderSession {
    pub fn new(client: IpAddr, state: State, gate: Rc<InflightGate>, outbox: Outbox) -> Self {
        SenderSession {
            client,
            state,
            sends: Sends::new(gate),
            outbox,
            heartbeat: Tick::now(),
            bad_frames: 0,
            fragments: None,
            me: None,
            listed: None,
        }
    }

    fn send_text(&mut self, text: String, ctx: &mut Context<Self>) {
        self.outbox.text(&text);
        self.check_unsent(ctx);
    }

    /// Cuts the connection if its unsent output passed [`MAX_UNSENT_BYTES`].
    fn check_unsent(&mut self, ctx: &mut Context<Self>) {
        if self.outbox.unsent() > MAX_UNSENT_BYTES {
            self.abort(ctx);
        }
    }

    fn close(&mut self, code: u16, why: &str, ctx: &mut Context<Self>) {
        self.outbox.close(Some(actix_http::ws::CloseReason {
            code: code.into(),
            description: Some(why.to_owned()),
        }));
        ctx.stop();
    }

    fn abort(&mut self, ctx: &mut Context<Self>) {
        self.outbox.cut();
        ctx.stop();
    }

    fn bad_frame(&mut self, message: &str, ctx: &mut Context<Self>) {
        self.bad_frames += 1;
        self.send_text(ServerFrame::Error { message }.to_text(), ctx);
        if self.bad_frames > MAX_BAD_FRAMES {
            self.close(close_code::POLICY, "too many unusable frames", ctx);
        }
    }

    /// A text message reassembled from fragments (its UTF-8 not yet checked).
    fn on_message(&mut self, bytes: &[u8], ctx: &mut Context<Self>) {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.on_text(text, ctx),
            Err(_) => self.bad_frame("text frame is not UTF-8", ctx),
        }
    }

    /// A whole text message, valid UTF-8.
    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        if text.len() > MAX_SEND_BYTES {
            return match wire::frame_id(text) {
                Some(id) => {
                    let refusal =
                        ApiError::TooLarge(format!("frame exceeds {MAX_SEND_BYTES} bytes"));
                    self.send_text(refusal_frame(&id, &refusal), ctx);
                }
                None => self.bad_frame("message too large", ctx),
            };
        }
        match wire::parse_client_frame(text) {
            ClientFrame::Send {
                id,
                destination,
                access_key: key,
                body,
            } => {
                self.bad_frames = 0;
                match key.as_deref().and_then(access_key) {
                    Some(key) => self.on_send(id, destination, key, body, ctx),
                    None => self.send_text(refusal_frame(&id, &ApiError::Unauthorized), ctx),
                }
            }
            ClientFrame::InvalidSend { id, reason } => {
                self.bad_frames = 0;
                self.send_text(refusal_frame(&id, &ApiError::BadRequest(reason)), ctx);
            }
            ClientFrame::Ack { .. } => self.bad_frame(
                "an unidentified connection receives nothing to acknowledge",
                ctx,
            ),
            ClientFrame::Unusable(why) => self.bad_frame(why, ctx),
        }
    }

    fn on_fragment(&mut self, item: Item, ctx: &mut Context<Self>) {
        let last = matches!(item, Item::Last(_));
        match item {
            Item::FirstText(b) => self.fragments = Some(b.to_vec()),
            Item::FirstBinary(_) => {
                self.fragments = None;
                self.bad_frame("frames are JSON text", ctx);
            }
            Item::Continue(b) | Item::Last(b) => {
                let Some(buf) = self.fragments.as_mut() else {
                    // Skipping a refused message (or a stray continuation).
                    return;
                };
                if buf.len() + b.len() > MAX_FRAME_BYTES {
                    self.fragments = None;
                    return self.bad_frame("message too large", ctx);
                }
                buf.extend_from_slice(&b);
                if last {
                    let buf = self.fragments.take().unwrap_or_default();
                    self.on_message(&buf, ctx);
                }
            }
        }
    }

    /// As a device's send, but as nobody.
    fn on_send(
        &mut self,
        id: serde_json::Number,
        destination: String,
        key: AccessKey,
        body: wire::SendRequest,
        ctx: &mut Context<Self>,
    ) {
        let from = SendAs::Unidentified {
            key,
            client: self.client,
        };
        let answer = answer_into(self.outbox.clone(), own_address(&mut self.me, ctx), id);
        self.sends
            .start(self.state.clone(), from, destination, body, answer);
    }
}

impl Handler<Overflowed> for SenderSession {
    type Result = ();

    fn handle(&mut self, _: Overflowed, ctx: &mut Context<Self>) {
        self.check_unsent(ctx);
    }
}

/// Only the drain tells an unidentified session to close (the router
/// never sees it): with `1001`, as every other socket, once its sends in
/// flight are answered (see [`close_once_answered`]).
impl Handler<Close> for SenderSession {
    type Result = ();

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        close_once_answered(
            ctx,
            |act| &act.sends,
            |act, ctx| act.close(close_code::GOING_AWAY, "server is shutting down", ctx),
        );
    }
}

impl Actor for SenderSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let me = own_address(&mut self.me, ctx).recipient();
        self.listed = Some(self.state.unidentified.add(me));
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, ctx| {
            if act.heartbeat.elapsed() >= CLIENT_TIMEOUT
                || act.outbox.stalled_for() >= CLIENT_TIMEOUT
            {
                act.abort(ctx);
                return;
            }
            act.outbox.ping();
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(id) = self.listed.take() {
            self.state.unidentified.remove(id);
        }
        finish_or_cut(&self.outbox, CLOSE_GRACE);
    }
}

impl StreamHandler<Result<Frame, ProtocolError>> for SenderSession {
    fn handle(&mut self, frame: Result<Frame, ProtocolError>, ctx: &mut Context<Self>) {
        self.heartbeat = Tick::now();
        let frame = match frame {
            Ok(frame) => frame,
            Err(ProtocolError::Overflow) => {
                return self.close(close_code::TOO_BIG, "frame too large", ctx);
            }
            Err(_) => return self.close(close_code::PROTOCOL_ERROR, "protocol error", ctx),
        };
        match frame {
            Frame::Text(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => self.on_text(text, ctx),
                Err(_) => self.close(close_code::INVALID_DATA, "text frame is not UTF-8", ctx),
            },
            Frame::Binary(_) => self.bad_frame("frames are JSON text", ctx),
            Frame::Continuation(item) => self.on_fragment(item, ctx),
            Frame::Ping(payload) => self.outbox.pong(payload),
            Frame::Pong(_) => {}
            Frame::Close(reason) => {
                self.outbox.close(reason);
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
