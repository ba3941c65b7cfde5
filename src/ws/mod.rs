//! The WebSocket transport: one [`session::DeviceSession`] actor per
//! connected device, beside `http/` as the other way clients reach the
//! services. It calls down into `service/` and talks to the router only
//! through the router's own messages.
//!
//! - [`session`]: the actor: lifecycle, pushes, acks, heartbeat, spills.
//! - [`frames`]: what each frame from the device does.
//! - [`replay`]: the mailbox replay, bounded by the device's acks.
//! - [`held`]: the copies a connection holds, bounded.
//! - [`gate`]: backpressure on a connection's sends.
//! - [`sends`]: a connection's sends, routed in frame order and answered.
//! - [`transport`]: the byte stream, which a stalled peer cannot freeze.
//! - [`takeover`]: how an upgraded connection leaves the HTTP dispatcher.
//! - [`rendezvous`]: one side of a rendezvous channel (its own small actor).
//! - [`unidentified`]: a connection without credentials that only sends
//!   sealed-sender messages (its own small actor).

pub mod frames;
pub mod gate;
pub mod held;
pub mod rendezvous;
pub mod replay;
pub mod sends;
pub mod session;
pub mod takeover;
pub mod transport;
pub mod unidentified;

use std::rc::Rc;

use actix::{Actor, AsyncContext, Context, StreamHandler};
use actix_http::body::MessageBody;
use actix_http::ws::{Frame, HandshakeError, ProtocolError};
use actix_web::{HttpRequest, HttpResponse};

use crate::domain::address::Address;
use crate::service::state::State;
use gate::{GatedStream, InflightGate};
use session::DeviceSession;
use transport::Outbox;
use unidentified::SenderSession;

/// Answers the upgrade of an authenticated device; its session starts on
/// this thread's arbiter once the answer is written.
pub fn start(
    req: &HttpRequest,
    address: Address,
    state: State,
) -> Result<HttpResponse, actix_web::Error> {
    upgrade(req, state, move |state, gate, outbox| {
        DeviceSession::new(address, state, gate, outbox)
    })
}

/// Answers the upgrade of an unidentified connection (no credentials); its
/// [`unidentified::SenderSession`] starts once the answer is written.
pub fn start_unidentified(
    req: &HttpRequest,
    client: std::net::IpAddr,
    state: State,
) -> Result<HttpResponse, actix_web::Error> {
    upgrade(req, state, move |state, gate, outbox| {
        SenderSession::new(client, state, gate, outbox)
    })
}

/// The handshake's answer, which starts the session actor `make` builds,
/// fed the connection's frames through its in-flight gate.
fn upgrade<A>(
    req: &HttpRequest,
    state: State,
    make: impl FnOnce(State, Rc<InflightGate>, Outbox) -> A + 'static,
) -> Result<HttpResponse, actix_web::Error>
where
    A: Actor<Context = Context<A>> + StreamHandler<Result<Frame, ProtocolError>>,
{
    let response = handshake(req)?;
    Ok(takeover::accept(response, move |conn| {
        let (inbox, outbox) = transport::open(conn, frames::MAX_FRAME_BYTES, &state.connections);
        let gate = InflightGate::new(state.config.max_inflight_sends);
        let frames = GatedStream::new(inbox, gate.clone());
        A::create(move |ctx| {
            ctx.add_stream(frames);
            make(state, gate, outbox)
        });
    }))
}

/// Checks the handshake; the `101` answer, without a body.
pub fn handshake(req: &HttpRequest) -> Result<HttpResponse, actix_web::Error> {
    // A handshake the upgrade service did not see (one with a chunked body)
    // cannot be taken over.
    if !takeover::is_upgradable(req) {
        return Err(HandshakeError::NoWebsocketUpgrade.into());
    }
    Ok(actix_http::ws::handshake(req.head())?
        .message_body(().boxed())?
        .into())
}
