//! `/v1/push`: Web Push subscriptions (SPEC "Push").

use actix_web::{web, HttpResponse};

use super::auth::Authenticated;
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{ApiError, ErrorBody};
use crate::service::push;
use crate::service::state::State;
use crate::wire::{PushSubscription, VapidKey};

/// The server's VAPID public key
///
/// The key push services check courier's pushes against; a client passes
/// it as `applicationServerKey` when it subscribes. The same on every node
/// of a cluster, and for the life of the database.
#[utoipa::path(
    get,
    path = "/v1/push/vapid-key",
    tag = "push",
    responses(
        (status = 200, description = "The key", body = VapidKey),
    )
)]
pub async fn get_vapid_key(state: State) -> HttpResponse {
    HttpResponse::Ok().json(VapidKey {
        public_key: state.vapid_public_key.clone(),
    })
}

/// Subscribe to wake-ups
///
/// Sets the calling device's push subscription (replacing an earlier one).
/// While the device is connected nowhere, a copy stored for it makes
/// courier POST an encrypted `{"op":"wake"}` to the endpoint, at most once
/// per `push_coalesce_secs`; the push never says who sent what.
#[utoipa::path(
    put,
    path = "/v1/push",
    tag = "push",
    security(("basic" = [])),
    request_body = PushSubscription,
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Not an https:// endpoint, a host that resolves to a loopback, private or other special address (or not at all), or malformed keys", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 413, description = "A body over 64 KiB", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn put_subscription(
    state: State,
    auth: Authenticated,
    body: web::Json<PushSubscription>,
) -> Result<HttpResponse, ApiError> {
    push::subscribe(&state, auth.0, body.into_inner()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Unsubscribe
///
/// Removes the calling device's push subscription, if it has one.
#[utoipa::path(
    delete,
    path = "/v1/push",
    tag = "push",
    security(("basic" = [])),
    responses(
        (status = 204, description = "Removed (or there was none)"),
        (status = 401, response = Unauthorized),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn delete_subscription(
    state: State,
    auth: Authenticated,
) -> Result<HttpResponse, ApiError> {
    push::unsubscribe(&state, auth.0).await?;
    Ok(HttpResponse::NoContent().finish())
}
