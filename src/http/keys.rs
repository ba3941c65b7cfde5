//! `/v1/keys`.

use actix_web::{web, HttpResponse};

use super::auth::Authenticated;
use crate::error::ApiError;
use crate::service::keys;
use crate::state::State;
use crate::wire::KeyUpload;

/// # `PUT /v1/keys`
/// `204`; 400 malformed; 409 identity key differs from the account's; 413 too
/// many keys; 422 bad key or signature (nothing stored).
pub async fn put_keys(
    state: State,
    auth: Authenticated,
    body: web::Json<KeyUpload>,
) -> Result<HttpResponse, ApiError> {
    keys::upload(&state, auth.0, body.into_inner()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// # `GET /v1/keys/count`
pub async fn get_key_count(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(keys::count(&state, auth.0).await?))
}

/// # `GET /v1/keys/{uuid}/{deviceId}`
/// `200` bundle (`*` for every device); 404 unknown account/device or no keys;
/// 429 per-account or per-(account, target) limit.
pub async fn get_bundle(
    state: State,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (target, device) = path.into_inner();
    Ok(HttpResponse::Ok().json(keys::bundle(&state, auth.0, &target, &device).await?))
}
