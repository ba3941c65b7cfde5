//! `GET /v1/websocket`: authenticates the upgrade and starts a `DeviceSession`.

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;

use super::auth::Authenticated;
use crate::actors::session::{DeviceSession, GatedStream, InflightGate, MAX_FRAME_BYTES};
use crate::error::ApiError;
use crate::state::State;

/// # `GET /v1/websocket`
/// `101` upgrade; 401 bad credentials; 503 while draining.
pub async fn connect(
    req: HttpRequest,
    stream: web::Payload,
    state: State,
    auth: Authenticated,
) -> Result<HttpResponse, actix_web::Error> {
    if state.is_draining() {
        return Err(ApiError::Unavailable.into());
    }
    let gate = InflightGate::new(state.config.max_inflight_sends);
    let session = DeviceSession::new(auth.0, state.clone(), gate.clone());
    ws::WsResponseBuilder::new(session, &req, GatedStream::new(stream, gate))
        .frame_size(MAX_FRAME_BYTES)
        .start()
}
