//! `/v1/messages`.

use actix_web::{web, HttpResponse};

use super::auth::{Authenticated, Sender};
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{ApiError, ErrorBody};
use crate::service::messaging::{self, SendAs};
use crate::service::state::State;
use crate::wire::{MessageList, SendRequest, SendResponse};

/// Send a message
///
/// One ciphertext per current device of the destination account. Answered
/// once every copy is acknowledged live or committed to its mailbox; a send
/// refused with any error delivered nothing. Sealed sender: with no
/// `Authorization` but the destination's `Unidentified-Access-Key`, every
/// copy must be of type 6 and the envelopes delivered name no sender.
#[utoipa::path(
    put,
    path = "/v1/messages/{uuid}",
    tag = "messages",
    security(("basic" = []), ("unidentified" = [])),
    params(("uuid" = String, Path, format = Uuid, description = "The destination account")),
    request_body = SendRequest,
    responses(
        (status = 200, description = "Every copy's outcome", body = SendResponse),
        (status = 400, description = "Malformed body or destination, empty or non-base64 content, a device addressed twice; an unidentified copy not of type 6; both kinds of credentials", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "No such account (identified sends only: an unidentified send to an unknown account is 401)", body = ErrorBody),
        (status = 409, description = "The device set is not current: `missingDevices`, `extraDevices` (mismatched_devices)", body = ErrorBody),
        (status = 410, description = "Devices re-registered: `staleDevices` (stale_devices)", body = ErrorBody),
        (status = 413, description = "A copy over 256 KiB, or a body over 8 MiB", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, description = "The server is draining, or too busy to reserve mailbox room", body = ErrorBody),
        (status = 507, description = "A destination mailbox is full (mailbox_full)", body = ErrorBody),
    )
)]
pub async fn send_messages(
    state: State,
    sender: Sender,
    path: web::Path<String>,
    body: web::Json<SendRequest>,
) -> Result<HttpResponse, ApiError> {
    let from = match sender {
        Sender::Device(address) => SendAs::Device(address),
        Sender::Unidentified { key, client } => SendAs::Unidentified { key, client },
    };
    let answer = messaging::send(&state, from, &path, body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(answer))
}

/// Fetch queued messages
///
/// The oldest page of the calling device's mailbox, oldest first. Copies stay
/// until acknowledged.
#[utoipa::path(
    get,
    path = "/v1/messages",
    tag = "messages",
    security(("basic" = [])),
    responses(
        (status = 200, description = "A page of envelopes", body = MessageList),
        (status = 401, response = Unauthorized),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn get_messages(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(messaging::fetch(&state, auth.0).await?))
}

/// Acknowledge a message
///
/// Deletes a copy from the calling device's mailbox, or acknowledges one
/// pushed live and not yet acknowledged (its sender is answered `delivered`).
#[utoipa::path(
    delete,
    path = "/v1/messages/{uuid}",
    tag = "messages",
    security(("basic" = [])),
    params(("uuid" = String, Path, format = Uuid, description = "The copy's `guid`")),
    responses(
        (status = 204, description = "Acknowledged"),
        (status = 401, response = Unauthorized),
        (status = 404, description = "Not a copy held for this device", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn ack_message(
    state: State,
    auth: Authenticated,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    messaging::acknowledge(&state, auth.0, &path).await?;
    Ok(HttpResponse::NoContent().finish())
}
