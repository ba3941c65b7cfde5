//! `/v1/accounts`.

use actix_web::{web, HttpResponse};

use super::auth::{Authenticated, ClientIp};
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{ApiError, ErrorBody};
use crate::service::accounts;
use crate::service::state::State;
use crate::wire::{AccountAttributes, RegisterRequest, RegisteredDevice};

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

/// Set the account's attributes
///
/// Who may send sealed-sender messages to the account: holders of its
/// unidentified-access key (16 bytes, which clients derive from the profile
/// key they share with contacts), or anyone when
/// `unrestrictedUnidentifiedAccess` is `true`. Primary device only.
#[utoipa::path(
    put,
    path = "/v1/accounts/attributes",
    tag = "accounts",
    security(("basic" = [])),
    request_body = AccountAttributes,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "Malformed body, or a key that is not 16 bytes of base64", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 403, description = "Not the primary device", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn set_attributes(
    state: State,
    auth: Authenticated,
    body: web::Json<AccountAttributes>,
) -> Result<HttpResponse, ApiError> {
    accounts::set_attributes(&state, auth.0, body.into_inner()).await?;
    Ok(HttpResponse::NoContent().finish())
}
