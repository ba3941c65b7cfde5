//! `RendezvousSession`: one side of a rendezvous channel, one actor per
//! WebSocket.
//!
//! It passes the client's binary frames to the [`RendezvousHub`] and the
//! hub's events to the client: the other side's frames as binary frames,
//! `peer-joined` and `peer-left` as the server's text frames. It holds
//! nothing else. The byte stream is the device session's ([`Outbox`],
//! [`Inbox`]): a peer that stops reading is cut once [`MAX_UNSENT_BYTES`]
//! wait for it, or its output makes no progress for [`CLIENT_TIMEOUT`].
//!
//! Close codes: 1000 when the channel's time is up; 1001 at shutdown; 1003
//! for a text frame (text is the server's); 1008 when more than
//! [`MAX_HELD_FRAMES`](crate::domain::rendezvous::MAX_HELD_FRAMES) frames would wait for a side that has not joined; 1009
//! for a frame (or fragmented message) over [`MAX_FRAME_BYTES`]; 1002 for a
//! WebSocket protocol error.

use std::time::Instant;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, StreamHandler};
use actix_http::ws::{CloseCode, CloseReason, Frame, Item, ProtocolError};
use actix_web::web::{Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};

use super::session::{close_code, CLIENT_TIMEOUT, CLOSE_GRACE, HEARTBEAT_INTERVAL};
use super::transport::{self, finish_or_cut, Outbox};
use crate::actors::rendezvous::{EndReason, HubLink, Leave, Relay, SideRef, ToSide};
use crate::domain::address::Address;
use crate::domain::rendezvous::MAX_FRAME_BYTES;
use crate::service::rendezvous;
use crate::service::state::State;
use crate::wire::{PEER_JOINED_FRAME, PEER_LEFT_FRAME};

/// Output queued for a side that does not read, past which it is cut: the
/// held frames it may be handed on joining (16 × 64 KiB) with room to spare.
pub const MAX_UNSENT_BYTES: usize = 2 * 1024 * 1024;

/// Answers the upgrade: checks the handshake, takes a slot on the channel
/// (`404`, `409` or `429` before anything is upgraded), then starts the
/// side's session on this thread's arbiter.
pub async fn start(
    req: &HttpRequest,
    address: Address,
    channel: &str,
    state: State,
) -> Result<HttpResponse, actix_web::Error> {
    // A request that is no WebSocket handshake must not take a slot.
    let response = super::handshake(req)?;
    // The session's address exists before the session does, so the hub can
    // be given it (and queue events for it) before the upgrade is answered.
    let ctx = Context::<RendezvousSession>::new();
    let (side, hub) = rendezvous::join(&state, address, channel, ctx.address().recipient()).await?;
    Ok(super::takeover::accept(response, move |conn| {
        let (inbox, outbox) = super::transport::open(conn, MAX_FRAME_BYTES, &state.connections);
        let mut ctx = ctx;
        ctx.add_stream(inbox);
        ctx.run(RendezvousSession {
            address,
            side,
            hub,
            outbox,
            heartbeat: Instant::now(),
            fragments: None,
        });
    }))
}

pub struct RendezvousSession {
    address: Address,
    side: SideRef,
    /// This node's hub, or the link to the node holding the channel.
    hub: HubLink,
    outbox: Outbox,
    /// When the client last sent anything.
    heartbeat: Instant,
    /// A binary message arriving in fragments.
    fragments: Option<BytesMut>,
}

impl RendezvousSession {
    fn close(&mut self, code: u16, why: &str, ctx: &mut Context<Self>) {
        self.outbox.close(Some(CloseReason {
            code: CloseCode::from(code),
            description: Some(why.to_owned()),
        }));
        ctx.stop();
    }

    /// Resets the connection at once (the client is not reading) and stops.
    fn abort(&mut self, ctx: &mut Context<Self>) {
        self.outbox.cut();
        ctx.stop();
    }

    /// Cuts a client that has stopped reading.
    fn check_unsent(&mut self, ctx: &mut Context<Self>) {
        if self.outbox.unsent() > MAX_UNSENT_BYTES {
            log::info!(
                "{}: rendezvous peer is not reading; cutting the connection",
                self.address
            );
            self.abort(ctx);
        }
    }

    fn relay(&mut self, frame: Bytes) {
        self.hub.relay.do_send(Relay {
            from: self.side,
            frame,
        });
    }

    /// Reassembles a fragmented binary message, bounded by [`MAX_FRAME_BYTES`].
    fn on_fragment(&mut self, item: Item, ctx: &mut Context<Self>) {
        let (bytes, last) = match item {
            Item::FirstText(_) => {
                return self.close(
                    close_code::UNSUPPORTED_DATA,
                    "text frames are the server's",
                    ctx,
                )
            }
            Item::FirstBinary(b) if self.fragments.is_none() => {
                self.fragments = Some(BytesMut::new());
                (b, false)
            }
            Item::Continue(b) if self.fragments.is_some() => (b, false),
            Item::Last(b) if self.fragments.is_some() => (b, true),
            _ => return self.close(close_code::PROTOCOL_ERROR, "bad fragment", ctx),
        };
        let Some(buf) = self.fragments.as_mut() else {
            return;
        };
        if buf.len() + bytes.len() > MAX_FRAME_BYTES {
            return self.close(close_code::TOO_BIG, "frame too large", ctx);
        }
        buf.extend_from_slice(&bytes);
        if last {
            let whole = self.fragments.take().unwrap_or_default().freeze();
            self.relay(whole);
        }
    }
}

impl Actor for RendezvousSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, ctx| {
            if act.heartbeat.elapsed() >= CLIENT_TIMEOUT
                || act.outbox.stalled_for() >= CLIENT_TIMEOUT
            {
                log::info!("{}: rendezvous side timed out", act.address);
                act.abort(ctx);
                return;
            }
            act.outbox.ping();
        });
    }

    fn stopping(&mut self, _: &mut Self::Context) -> actix::Running {
        // Harmless if the hub has already let go of this side.
        self.hub.leave.do_send(Leave { side: self.side });
        actix::Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        finish_or_cut(&self.outbox, CLOSE_GRACE);
    }
}

impl StreamHandler<Result<Frame, ProtocolError>> for RendezvousSession {
    fn handle(&mut self, frame: Result<Frame, ProtocolError>, ctx: &mut Context<Self>) {
        self.heartbeat = Instant::now();
        let frame = match frame {
            Ok(frame) => frame,
            Err(ProtocolError::Overflow) => {
                return self.close(close_code::TOO_BIG, "frame too large", ctx)
            }
            Err(e) => {
                log::debug!("{}: rendezvous protocol error: {e}", self.address);
                return self.close(close_code::PROTOCOL_ERROR, "protocol error", ctx);
            }
        };
        match frame {
            Frame::Binary(_) if self.fragments.is_some() => {
                self.close(close_code::PROTOCOL_ERROR, "bad fragment", ctx)
            }
            // The thread's read storage must not wait on the other side.
            Frame::Binary(bytes) => self.relay(transport::owned(bytes)),
            Frame::Text(_) => self.close(
                close_code::UNSUPPORTED_DATA,
                "text frames are the server's",
                ctx,
            ),
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

impl Handler<ToSide> for RendezvousSession {
    type Result = ();

    fn handle(&mut self, msg: ToSide, ctx: &mut Context<Self>) {
        match msg {
            ToSide::Frame(bytes) => self.outbox.binary(bytes),
            ToSide::PeerJoined => self.outbox.text(PEER_JOINED_FRAME),
            ToSide::PeerLeft => self.outbox.text(PEER_LEFT_FRAME),
            ToSide::End(EndReason::Expired) => {
                return self.close(close_code::NORMAL, "channel expired", ctx)
            }
            ToSide::End(EndReason::TooManyHeld) => {
                return self.close(
                    close_code::POLICY,
                    "too many frames held for the other side",
                    ctx,
                )
            }
            ToSide::End(EndReason::Draining) => {
                return self.close(close_code::GOING_AWAY, "server is shutting down", ctx)
            }
        }
        self.check_unsent(ctx);
    }
}
