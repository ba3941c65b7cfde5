//! What a `DeviceSession` does with each frame from the device: sends,
//! acks, fragments, pings, close, and frames it cannot use.

use super::session::{close_code, DeviceSession, MAX_UNSENT_BYTES};
use super::transport::Outbox;
use crate::clock::Tick;
use crate::error::ApiError;
use crate::service::messaging::SendAs;
use crate::wire::{self, ClientFrame, ServerFrame, MAX_SEND_BYTES};
use actix::{
    Actor, ActorContext, AsyncContext, Context, Handler, Message, StreamHandler, WeakAddr,
};
use actix_http::ws::{Frame, Item, ProtocolError};
use actix_web::web::Bytes;

/// Consecutive unusable frames tolerated before the connection is closed.
const MAX_BAD_FRAMES: u32 = 100;
/// Largest message read whole: a message above [`MAX_SEND_BYTES`] and up to
/// this is answered `413` with its `id`; a frame beyond it cannot be skipped
/// and closes the connection with 1009.
pub const MAX_FRAME_BYTES: usize = 2 * MAX_SEND_BYTES;

impl StreamHandler<Result<Frame, ProtocolError>> for DeviceSession {
    fn handle(&mut self, frame: Result<Frame, ProtocolError>, ctx: &mut Context<Self>) {
        self.heartbeat = Tick::now();
        let frame = match frame {
            Ok(frame) => frame,
            Err(ProtocolError::Overflow) => {
                return self.close(close_code::TOO_BIG, "frame too large", ctx);
            }
            Err(e) => {
                log::debug!("{}: protocol error: {e}", self.address);
                return self.close(close_code::PROTOCOL_ERROR, "protocol error", ctx);
            }
        };
        match frame {
            // RFC 6455 §8.1: a text frame that is not UTF-8 fails the
            // connection. (Reassembled fragments get an error frame instead.)
            Frame::Text(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => self.on_text(text, ctx),
                Err(_) => self.close(close_code::INVALID_DATA, "text frame is not UTF-8", ctx),
            },
            Frame::Binary(_) => self.bad_frame("frames are JSON text", ctx),
            Frame::Continuation(item) => self.on_fragment(item, ctx),
            Frame::Ping(payload) => self.outbox.pong(payload),
            Frame::Pong(_) => {}
            // Answer the close handshake (RFC 6455 §5.5.1) before stopping.
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

impl DeviceSession {
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
            // Answered like an oversize HTTP body, where the id can be read.
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
                access_key: Some(_),
                ..
            } => {
                // Sent here, the device's own connection would tie it to
                // the sealed message.
                self.bad_frames = 0;
                let refusal = ApiError::bad_request(
                    "sealed-sender sends go over an unidentified connection, not the device's own",
                );
                self.send_text(refusal_frame(&id, &refusal), ctx);
            }
            ClientFrame::Send {
                id,
                destination,
                access_key: None,
                body,
            } => self.on_send(id, destination, body, ctx),
            ClientFrame::InvalidSend { id, reason } => {
                self.bad_frames = 0;
                self.send_text(refusal_frame(&id, &ApiError::BadRequest(reason)), ctx);
            }
            ClientFrame::Ack { guid } => {
                self.on_ack(guid, false, ctx);
            }
            ClientFrame::Unusable(why) => self.bad_frame(why, ctx),
        }
    }

    fn bad_frame(&mut self, message: &str, ctx: &mut Context<Self>) {
        self.bad_frames += 1;
        self.send_text(ServerFrame::Error { message }.to_text(), ctx);
        if self.bad_frames > MAX_BAD_FRAMES {
            log::info!("{}: too many unusable frames; closing", self.address);
            self.close(close_code::POLICY, "too many unusable frames", ctx);
        }
    }

    /// Reassembles a fragmented text message (bounded by [`MAX_FRAME_BYTES`]).
    fn on_fragment(&mut self, item: Item, ctx: &mut Context<Self>) {
        let last = matches!(item, Item::Last(_));
        match item {
            Item::FirstText(b) => {
                self.skipping_fragments = false;
                self.fragments = Some(b.to_vec());
            }
            Item::FirstBinary(_) => {
                self.fragments = None;
                self.skipping_fragments = !last;
                self.bad_frame("frames are JSON text", ctx);
            }
            Item::Continue(_) | Item::Last(_) if self.skipping_fragments => {
                self.skipping_fragments = !last;
            }
            Item::Continue(b) | Item::Last(b) => self.add_fragment(b, last, ctx),
        }
    }

    fn add_fragment(&mut self, b: Bytes, last: bool, ctx: &mut Context<Self>) {
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
            self.on_message(&buf, ctx);
        }
    }

    fn on_send(
        &mut self,
        id: serde_json::Number,
        destination: String,
        body: wire::SendRequest,
        ctx: &mut Context<Self>,
    ) {
        self.bad_frames = 0;
        let answer = answer_into(self.outbox.clone(), own_address(&mut self.me, ctx), id);
        let from = SendAs::Device(self.address);
        self.sends
            .start(self.state.clone(), from, destination, body, answer);
    }
}

/// Where a send's answer goes: straight into the connection's outbox (its
/// wait runs on the session's thread), not through the session's mailbox, which cost an actor wakeup and a message per send.
/// An answer after the session closed its outbox is dropped, as a message
/// to a stopped session was. If the answer leaves more unsent than
/// [`MAX_UNSENT_BYTES`], the session is told to cut the connection.
pub(super) fn answer_into<A>(
    outbox: Outbox,
    session: WeakAddr<A>,
    id: serde_json::Number,
) -> impl FnOnce(Result<wire::SendResponse, ApiError>) + 'static
where
    A: Actor<Context = Context<A>> + Handler<Overflowed>,
{
    move |result| {
        outbox.text_with(|out| write_response_frame(out, &id, result));
        if outbox.unsent() > MAX_UNSENT_BYTES {
            if let Some(session) = session.upgrade() {
                session.do_send(Overflowed);
            }
        }
    }
}

/// The session's own address, made on its first send and kept (weak, so
/// it does not keep the session's mailbox open): `ctx.address()` makes a
/// new sender, two allocations, every time.
pub(super) fn own_address<A>(me: &mut Option<WeakAddr<A>>, ctx: &Context<A>) -> WeakAddr<A>
where
    A: Actor<Context = Context<A>>,
{
    me.get_or_insert_with(|| ctx.address().downgrade()).clone()
}

/// A send's answer left the outbox over [`MAX_UNSENT_BYTES`] (see
/// [`answer_into`]): the peer is not reading.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Overflowed;

impl Handler<Overflowed> for DeviceSession {
    type Result = ();

    fn handle(&mut self, _: Overflowed, ctx: &mut Context<Self>) {
        self.check_unsent(ctx);
    }
}

/// The `response` frame refusing a send with `e`.
pub(super) fn refusal_frame(id: &serde_json::Number, e: &ApiError) -> String {
    wire::response_frame(id, e.status().as_u16(), &e.body())
}

/// Writes a send's answer onto `out`.
fn write_response_frame(
    out: &mut String,
    id: &serde_json::Number,
    result: Result<wire::SendResponse, ApiError>,
) {
    match result {
        Ok(r) => wire::write_send_response_frame(out, id, &r),
        Err(e) => out.push_str(&refusal_frame(id, &e)),
    }
}
