//! `/v1/keys`.

use actix_web::{web, HttpResponse};

use super::auth::Authenticated;
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{ApiError, ErrorBody};
use crate::service::keys;
use crate::service::state::State;
use crate::wire::{BundleResponse, KeyCount, KeyUpload};

/// Upload keys
///
/// All of it is stored, or (on any error) nothing. The primary's first upload
/// sets the account's identity key; a device's first upload must carry
/// `signedPreKey`. Re-uploading a `keyId` replaces that key.
#[utoipa::path(
    put,
    path = "/v1/keys",
    tag = "keys",
    security(("basic" = [])),
    request_body = KeyUpload,
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Malformed body, a repeated keyId, or a first upload without signedPreKey", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 409, description = "The identity key differs from the account's (identity_key_mismatch)", body = ErrorBody),
        (status = 413, description = "Over 100 keys of a kind in one upload, over `max_one_time_keys` stored, or a body over 1 MiB", body = ErrorBody),
        (status = 422, description = "A key or signature is malformed or does not verify (invalid_key)", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn put_keys(
    state: State,
    auth: Authenticated,
    body: web::Json<KeyUpload>,
) -> Result<HttpResponse, ApiError> {
    keys::upload(&state, auth.0, body.into_inner()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Count one-time keys
///
/// How many one-time keys of each kind the calling device has left.
#[utoipa::path(
    get,
    path = "/v1/keys/count",
    tag = "keys",
    security(("basic" = [])),
    responses(
        (status = 200, description = "The counts", body = KeyCount),
        (status = 401, response = Unauthorized),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn get_key_count(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(keys::count(&state, auth.0).await?))
}

/// Fetch a prekey bundle
///
/// Consumes one one-time key of each kind per device in the bundle. Only
/// devices that have uploaded a signed prekey are listed.
#[utoipa::path(
    get,
    path = "/v1/keys/{uuid}/{device_id}",
    tag = "keys",
    security(("basic" = [])),
    params(
        ("uuid" = String, Path, format = Uuid, description = "The account"),
        ("device_id" = String, Path, pattern = "^(\\*|[0-9]{1,10})$",
            description = "A device id, or `*` for every device"),
    ),
    responses(
        (status = 200, description = "The bundle", body = BundleResponse),
        (status = 401, response = Unauthorized),
        (status = 404, description = "Unknown account or device, or no keys", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn get_bundle(
    state: State,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (target, device) = path.into_inner();
    Ok(HttpResponse::Ok().json(keys::bundle(&state, auth.0, &target, &device).await?))
}
