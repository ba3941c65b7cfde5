//! `/v1/accounts`.

use actix_web::{web, HttpResponse};

use super::auth::{Authenticated, ClientIp};
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{ApiError, ErrorBody};
use crate::service::accounts;
use crate::service::state::State;
use crate::wire::{RegisterRequest, RegisteredDevice};

/// Register an account
///
/// Creates an account with its first (primary) device, `1`. The password is
/// that device's secret.
#[utoipa::path(
    post,
    path = "/v1/accounts",
    tag = "accounts",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "The account and its primary device", body = RegisteredDevice),
        (status = 400, description = "Malformed body, bad password or registrationId", body = ErrorBody),
        (status = 403, description = "Missing or wrong registrationToken (when the server requires one)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn register(
    state: State,
    ip: ClientIp,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let created = accounts::register(&state, ip.0, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(created))
}

/// Delete the account
///
/// Removes the account with all its devices, keys and mailboxes, and closes
/// their connections. Primary device only.
#[utoipa::path(
    delete,
    path = "/v1/accounts/me",
    tag = "accounts",
    security(("basic" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "Not the primary device", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn delete_account(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    accounts::delete_account(&state, auth.0).await?;
    Ok(HttpResponse::NoContent().finish())
}
