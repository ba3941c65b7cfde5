//! `/v1/rendezvous`: channels for a PAKE between two sides (SPEC "Rendezvous").

use actix_web::{web, HttpRequest, HttpResponse};

use super::auth::Authenticated;
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{ApiError, ErrorBody};
use crate::service::rendezvous;
use crate::service::state::State;
use crate::wire::RendezvousChannel;

/// Open a rendezvous channel
///
/// A new channel with a random 8-digit id, alive for `rendezvous_ttl_secs`
/// (600 by default). Two sides join it with `GET /v1/rendezvous/{channel}`.
#[utoipa::path(
    post,
    path = "/v1/rendezvous",
    tag = "rendezvous",
    security(("basic" = [])),
    responses(
        (status = 201, description = "A new channel", body = RendezvousChannel),
        (status = 401, response = Unauthorized),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, description = "The server is draining", body = ErrorBody),
    )
)]
pub async fn create_channel(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Unavailable);
    }
    let channel = rendezvous::create(&state, auth.0).await?;
    Ok(HttpResponse::Created().json(channel))
}

/// Join a rendezvous channel
///
/// An RFC 6455 upgrade, authenticated as `GET /v1/websocket` is (Basic, or
/// the `login` and `password` query parameters). At most two sides: the
/// first two joins take the channel's two places for good. Binary frames
/// (at most 64 KiB) pass to the other side unchanged and in order; up to 16
/// wait for a side that has not joined yet. The server's own frames are text:
/// `{"op":"peer-joined"}` and `{"op":"peer-left"}`. Close codes are in
/// `docs/protocol.md`. Every attempt counts against the join rate limit.
#[utoipa::path(
    get,
    path = "/v1/rendezvous/{channel}",
    tag = "rendezvous",
    security(("basic" = [])),
    params(
        ("channel" = String, Path, pattern = "^[0-9]{8}$", description = "The id `POST /v1/rendezvous` gave"),
        ("Upgrade" = String, Header, pattern = "^websocket$"),
        ("Connection" = String, Header, pattern = "[Uu]pgrade", description = "Must include `Upgrade`"),
        ("Sec-WebSocket-Version" = String, Header, pattern = "^13$"),
        ("Sec-WebSocket-Key" = String, Header, pattern = "^[A-Za-z0-9+/]{21}[AQgw]==$",
            description = "16 random bytes, base64"),
        ("login" = Option<String>, Query, description = "`UUID.DEVICE`, instead of Basic auth"),
        ("password" = Option<String>, Query, description = "The device's secret, with `login`"),
    ),
    responses(
        (status = 101, description = "Switching Protocols: this side is on the channel until it or the server closes"),
        (status = 400, description = "Not a valid WebSocket handshake (empty body)"),
        (status = 401, response = Unauthorized),
        (status = 404, description = "No such channel, or its time is up", body = ErrorBody),
        (status = 409, description = "The channel already has its two sides (`channel_full`)", body = ErrorBody),
        (status = 426, description = "Unsupported WebSocket version (empty body; `Sec-WebSocket-Version: 13`)"),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, description = "The server is draining", body = ErrorBody),
    )
)]
pub async fn join_channel(
    req: HttpRequest,
    state: State,
    auth: Authenticated,
    channel: web::Path<String>,
) -> Result<HttpResponse, actix_web::Error> {
    if state.is_draining() {
        return Err(ApiError::Unavailable.into());
    }
    crate::ws::rendezvous::start(&req, auth.0, &channel, state).await
}
