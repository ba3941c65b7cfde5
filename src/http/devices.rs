//! `/v1/devices`.

use actix_web::{web, HttpResponse};

use super::auth::{Authenticated, ClientIp};
use crate::domain::address::DeviceId;
use crate::error::ApiError;
use crate::service::accounts;
use crate::state::State;
use crate::wire::LinkRequest;

/// # `POST /v1/devices/provisioning`
/// `201 {code, expiresAt}`; 403 unless the primary device.
pub async fn create_provisioning_code(
    state: State,
    auth: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let code = accounts::provision(&state, auth.0).await?;
    Ok(HttpResponse::Created().json(code))
}

/// # `POST /v1/devices`
/// `201 {uuid, deviceId}`; 403 invalid, used or expired code; 429 per-IP limit.
pub async fn link_device(
    state: State,
    ip: ClientIp,
    body: web::Json<LinkRequest>,
) -> Result<HttpResponse, ApiError> {
    let linked = accounts::link(&state, ip.0, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(linked))
}

/// # `GET /v1/devices`
pub async fn list_devices(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(accounts::list_devices(&state, auth.0).await?))
}

/// # `DELETE /v1/devices/{deviceId}`
/// `204`; 403 not the primary nor the device itself; 404 no such device.
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
