//! `/v1/messages`.

use actix_web::{web, HttpResponse};

use super::auth::Authenticated;
use crate::error::ApiError;
use crate::service::messaging;
use crate::state::State;
use crate::wire::SendRequest;

/// # `PUT /v1/messages/{uuid}`
/// `200 {results}` once every copy is acknowledged live or committed; 400
/// malformed; 404 unknown account; 409 `{missingDevices, extraDevices}`; 410
/// `{staleDevices}`; 413 copy over 256 KiB; 429; 507 mailbox full.
pub async fn send_messages(
    state: State,
    auth: Authenticated,
    path: web::Path<String>,
    body: web::Json<SendRequest>,
) -> Result<HttpResponse, ApiError> {
    let answer = messaging::send(&state, auth.0, &path, body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(answer))
}

/// # `GET /v1/messages`
/// `{messages, more}`, oldest first.
pub async fn get_messages(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(messaging::fetch(&state, auth.0).await?))
}

/// # `DELETE /v1/messages/{guid}`
/// `204`; 404 not in this device's mailbox.
pub async fn ack_message(
    state: State,
    auth: Authenticated,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    messaging::acknowledge(&state, auth.0, &path).await?;
    Ok(HttpResponse::NoContent().finish())
}
