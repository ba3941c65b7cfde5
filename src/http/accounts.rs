//! `/v1/accounts`.

use actix_web::{web, HttpResponse};

use super::auth::{Authenticated, ClientIp};
use crate::error::ApiError;
use crate::service::accounts;
use crate::state::State;
use crate::wire::RegisterRequest;

/// # `POST /v1/accounts`
/// `201 {uuid, deviceId}`; 400 bad password or registrationId; 403 missing or
/// wrong registrationToken; 429 per-IP limit.
pub async fn register(
    state: State,
    ip: ClientIp,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let created = accounts::register(&state, ip.0, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(created))
}

/// # `DELETE /v1/accounts/me`
/// `204`; 403 unless the primary device.
pub async fn delete_account(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    accounts::delete_account(&state, auth.0).await?;
    Ok(HttpResponse::NoContent().finish())
}
