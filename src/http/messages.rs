//! `/v1/messages`.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::auth::{access_key, client_ip, Authenticated, Sender, UNIDENTIFIED_ACCESS_KEY};
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{AccountDevices, ApiError, ErrorBody};
use crate::service::messaging::{self, SendAs};
use crate::service::multi_recipient;
use crate::service::state::State;
use crate::wire::{
    MessageList, MultiRecipientBody, MultiRecipientQuery, MultiRecipientResponse, SendRequest,
    SendResponse, MAX_SEND_BYTES,
};

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

/// The content type of a Sealed Sender v2 body.
pub const MRM_CONTENT_TYPE: &str = "application/vnd.signal-messenger.mrm";

/// Send one sealed message to many accounts
///
/// The body is a Sealed Sender v2 SentMessage exactly as libsignal's
/// `sealedSenderMultiRecipientEncrypt` writes it (at most 1,000 recipient
/// accounts). `Unidentified-Access-Key` is the XOR of the access keys of
/// every recipient account that does not allow unrestricted access. Each
/// recipient device gets an envelope of type 6, with no sender, whose
/// content is its account's ReceivedMessage. Answered once every copy is
/// acknowledged live or stored; a refused send delivered nothing.
#[utoipa::path(
    put,
    path = "/v1/messages/multi_recipient",
    tag = "messages",
    security(("unidentified" = [])),
    params(MultiRecipientQuery),
    request_body(content = MultiRecipientBody, content_type = "application/vnd.signal-messenger.mrm",
        description = "A Sealed Sender v2 SentMessage"),
    responses(
        (status = 200, description = "Every copy acknowledged or stored", body = MultiRecipientResponse),
        (status = 400, description = "Not a Sealed Sender v2 body (or not that content type), or a bad `ts`", body = ErrorBody),
        (status = 401, description = "No `Unidentified-Access-Key`, or not the XOR of the recipients' keys", body = ErrorBody),
        (status = 404, description = "A recipient account does not exist", body = ErrorBody),
        (status = 409, description = "Some recipients' device sets are not current: `[{uuid, devices: {missingDevices, extraDevices}}]`", body = Vec<AccountDevices>),
        (status = 410, description = "Some recipients' devices re-registered: `[{uuid, devices: {staleDevices}}]`", body = Vec<AccountDevices>),
        (status = 413, description = "A body over 8 MiB, or over 256 KiB per recipient", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, description = "The server is draining, or too busy to reserve mailbox room", body = ErrorBody),
        (status = 507, description = "A destination mailbox is full (mailbox_full)", body = ErrorBody),
    )
)]
pub async fn send_multi_recipient(
    state: State,
    req: HttpRequest,
    query: web::Query<MultiRecipientQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.eq_ignore_ascii_case(MRM_CONTENT_TYPE) {
        return Err(ApiError::bad_request(format!(
            "the body must be {MRM_CONTENT_TYPE}"
        )));
    }
    let client = client_ip(&req, &state.config.trusted_proxies);
    let key = req
        .headers()
        .get(UNIDENTIFIED_ACCESS_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(access_key);
    let Some(key) = key else {
        state.limits.auth_failure(client).await?;
        return Err(ApiError::Unauthorized);
    };
    let body = read_body(payload, MAX_SEND_BYTES).await?;
    let answer = multi_recipient::send(&state, key, client, query.ts, query.online, &body).await?;
    Ok(HttpResponse::Ok().json(answer))
}

/// A whole request body of at most `limit` bytes; beyond it `413`, and a
/// broken stream `400`, both as the SPEC's error body.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    use futures_util::StreamExt as _;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(format!(
                "request body exceeds {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
