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
//! - [`transport`]: the byte stream, which a stalled peer cannot freeze.
//! - [`rendezvous`]: one side of a rendezvous channel (its own small actor).
//! - [`unidentified`]: a connection without credentials that only sends
//!   sealed-sender messages (its own small actor).

pub mod frames;
pub mod gate;
pub mod held;
pub mod rendezvous;
pub mod replay;
pub mod session;
pub mod transport;
pub mod unidentified;

use std::rc::Rc;

use actix::{Actor, AsyncContext, Context, StreamHandler};
use actix_http::body::{BodyStream, MessageBody};
use actix_http::ws::{Frame, ProtocolError};
use actix_web::{web, HttpRequest, HttpResponse};

use crate::domain::address::Address;
use crate::service::state::State;
use gate::{GatedStream, InflightGate};
use session::DeviceSession;
use transport::{ConnSocket, Inbox, Outbox};
use unidentified::SenderSession;

/// Answers the upgrade of an authenticated device and starts its session
/// on this thread's arbiter.
pub fn start(
    req: &HttpRequest,
    payload: web::Payload,
    address: Address,
    state: State,
) -> Result<HttpResponse, actix_web::Error> {
    upgrade(req, payload, state, move |state, gate, outbox, socket| {
        DeviceSession::new(address, state, gate, outbox, socket)
    })
}

/// Answers the upgrade of an unidentified connection (no credentials) and
/// starts its [`unidentified::SenderSession`].
pub fn start_unidentified(
    req: &HttpRequest,
    payload: web::Payload,
    client: std::net::IpAddr,
    state: State,
) -> Result<HttpResponse, actix_web::Error> {
    upgrade(req, payload, state, move |state, gate, outbox, socket| {
        SenderSession::new(client, state, gate, outbox, socket)
    })
}

/// The handshake answer, and the session actor `make` builds, fed the
/// connection's frames through its in-flight gate.
fn upgrade<A>(
    req: &HttpRequest,
    payload: web::Payload,
    state: State,
    make: impl FnOnce(State, Rc<InflightGate>, Outbox, Option<ConnSocket>) -> A + 'static,
) -> Result<HttpResponse, actix_web::Error>
where
    A: Actor<Context = Context<A>> + StreamHandler<Result<Frame, ProtocolError>>,
{
    let mut response = actix_http::ws::handshake(req.head())?;
    let (outbox, body) = Outbox::new();
    let gate = InflightGate::new(state.config.max_inflight_sends);
    let socket = req.conn_data::<ConnSocket>().cloned();
    let frames = GatedStream::new(Inbox::new(payload, frames::MAX_FRAME_BYTES), gate.clone());
    A::create(move |ctx| {
        ctx.add_stream(frames);
        make(state, gate, outbox, socket)
    });
    Ok(response.message_body(BodyStream::new(body).boxed())?.into())
}
