//! `GET /v1/websocket`: authenticates the upgrade and hands the connection
//! to the WebSocket transport (`crate::ws`).

use actix_web::{web, HttpRequest, HttpResponse};

use super::auth::Authenticated;
use crate::error::ApiError;
use crate::state::State;

/// # `GET /v1/websocket`
/// `101` upgrade; 401 bad credentials; 503 while draining.
pub async fn connect(
    req: HttpRequest,
    payload: web::Payload,
    state: State,
    auth: Authenticated,
) -> Result<HttpResponse, actix_web::Error> {
    if state.is_draining() {
        return Err(ApiError::Unavailable.into());
    }
    crate::ws::start(&req, payload, auth.0, state)
}
