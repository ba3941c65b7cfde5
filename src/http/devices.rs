//! `/v1/devices`.

use actix_web::{web, HttpResponse};

use super::auth::{Authenticated, ClientIp};
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::domain::address::DeviceId;
use crate::error::{ApiError, ErrorBody};
use crate::service::accounts;
use crate::service::state::State;
use crate::wire::{DeviceInfo, LinkRequest, ProvisioningCode, RegisteredDevice};

/// Create a linking code
///
/// A single-use code a new device presents to `POST /v1/devices`. Primary
/// device only.
#[utoipa::path(
    post,
    path = "/v1/devices/provisioning",
    tag = "devices",
    security(("basic" = [])),
    responses(
        (status = 201, description = "A fresh code", body = ProvisioningCode),
        (status = 401, response = Unauthorized),
        (status = 403, description = "Not the primary device", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn create_provisioning_code(
    state: State,
    auth: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let code = accounts::provision(&state, auth.0).await?;
    Ok(HttpResponse::Created().json(code))
}

/// Link a device
///
/// Adds a device to the account whose linking code this is, and consumes the
/// code. The password is the new device's secret.
#[utoipa::path(
    post,
    path = "/v1/devices",
    tag = "devices",
    request_body = LinkRequest,
    responses(
        (status = 201, description = "The new device", body = RegisteredDevice),
        (status = 400, description = "Malformed body, bad password or registrationId", body = ErrorBody),
        (status = 403, description = "Unknown, used or expired code, or the account has `max_devices` devices", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn link_device(
    state: State,
    ip: ClientIp,
    body: web::Json<LinkRequest>,
) -> Result<HttpResponse, ApiError> {
    let linked = accounts::link(&state, ip.0, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(linked))
}

/// List the account's devices
#[utoipa::path(
    get,
    path = "/v1/devices",
    tag = "devices",
    security(("basic" = [])),
    responses(
        (status = 200, description = "Every device of the caller's account", body = Vec<DeviceInfo>),
        (status = 401, response = Unauthorized),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn list_devices(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(accounts::list_devices(&state, auth.0).await?))
}

/// Remove a device
///
/// The primary device may remove any linked device, a linked device itself.
/// The primary is removed only with its account (`DELETE /v1/accounts/me`).
#[utoipa::path(
    delete,
    path = "/v1/devices/{device_id}",
    tag = "devices",
    security(("basic" = [])),
    params(
        ("device_id" = i64, Path, minimum = 1, maximum = 4294967295_u32,
            description = "A device of the caller's account"),
    ),
    responses(
        (status = 204, description = "Removed; its connection is closed"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "The primary device, or neither the primary nor the device itself", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn delete_device(
    state: State,
    auth: Authenticated,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let target: DeviceId = path
        .parse()
        .map_err(|_| ApiError::NotFound("no such device"))?;
    accounts::delete_device(&state, auth.0, target).await?;
    Ok(HttpResponse::NoContent().finish())
}
