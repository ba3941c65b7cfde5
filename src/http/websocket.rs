//! `GET /v1/websocket`: authenticates the upgrade and hands the connection
//! to the WebSocket transport (`crate::ws`).

use actix_web::{HttpRequest, HttpResponse};

use super::auth::Connecting;
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{ApiError, ErrorBody};
use crate::service::state::State;

/// Open the device's WebSocket
///
/// An RFC 6455 upgrade. The session's JSON frames (live messages, sends,
/// acks), its close codes and the delivery guarantee are in
/// `docs/protocol.md`. Browsers, which cannot set headers on a WebSocket, may
/// authenticate with the `login` and `password` query parameters instead
/// (upgrade requests only; values are percent-decoded, `+` stays `+`).
/// With no credentials at all the connection is *unidentified*: it only
/// sends sealed-sender messages, each `send` frame carrying the
/// destination's `unidentifiedAccessKey`, and receives nothing.
#[utoipa::path(
    get,
    path = "/v1/websocket",
    tag = "websocket",
    security(("basic" = []), ()),
    params(
        ("Upgrade" = String, Header, pattern = "^websocket$"),
        ("Connection" = String, Header, pattern = "[Uu]pgrade", description = "Must include `Upgrade`"),
        ("Sec-WebSocket-Version" = String, Header, pattern = "^13$"),
        ("Sec-WebSocket-Key" = String, Header, pattern = "^[A-Za-z0-9+/]{21}[AQgw]==$",
            description = "16 random bytes, base64"),
        ("login" = Option<String>, Query, description = "`UUID.DEVICE`, instead of Basic auth"),
        ("password" = Option<String>, Query, description = "The device's secret, with `login`"),
    ),
    responses(
        (status = 101, description = "Switching Protocols: the session runs until either side closes"),
        (status = 400, description = "Not a valid WebSocket handshake (empty body)"),
        (status = 401, response = Unauthorized),
        (status = 426, description = "Unsupported WebSocket version (empty body; `Sec-WebSocket-Version: 13`)"),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, description = "The server is draining", body = ErrorBody),
    )
)]
pub async fn connect(
    req: HttpRequest,
    state: State,
    who: Connecting,
) -> Result<HttpResponse, actix_web::Error> {
    if state.is_draining() {
        return Err(ApiError::Unavailable.into());
    }
    match who {
        Connecting::Device(address) => crate::ws::start(&req, address, state),
        Connecting::Unidentified(client) => {
            state
                .limits
                .check(crate::limits::Limit::UnidentifiedConnectPerIp, client)
                .await?;
            crate::ws::start_unidentified(&req, client, state)
        }
    }
}
