//! `/healthz`, `/readyz`, `/metrics`: unauthenticated, for the operator.

use actix_web::HttpResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::service::state::State;
use crate::store;

/// `{"status": …}` of `/healthz` and `/readyz`.
#[derive(Serialize, ToSchema)]
pub struct Status {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    #[schema(value_type = String, example = "ok")]
    pub status: &'static str,
}

/// Liveness
///
/// The process is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses((status = 200, description = "Alive: `{\"status\": \"ok\"}`", body = Status))
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Status { status: "ok" })
}

/// Readiness
///
/// The database answers, the server is not draining and, in a cluster,
/// the bus (Redis) is reachable.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "Ready: `{\"status\": \"ready\"}`", body = Status),
        (status = 503, description = "Draining, the database does not answer, or (in a cluster) Redis is unreachable", body = ErrorBody),
    )
)]
pub async fn readyz(state: State) -> HttpResponse {
    if state.is_draining() {
        return actix_web::ResponseError::error_response(&ApiError::Unavailable);
    }
    // A member cut off from the bus still accepts sends (it stores them),
    // but cannot deliver across nodes: a balancer should prefer others.
    if state.cluster.as_ref().is_some_and(|c| !c.bus.is_up()) {
        return HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"error": "unavailable", "message": "redis unreachable"}));
    }
    let ping = store::blocking(&state.pool, |conn| {
        store::with_conn!(conn, c => diesel::connection::SimpleConnection::batch_execute(c, "SELECT 1"))
            .map_err(|e| ApiError::from(store::StoreError::Query(e)))
    })
    .await;
    match ping {
        Ok(()) => HttpResponse::Ok().json(Status { status: "ready" }),
        Err(_) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"error": "unavailable", "message": "database unreachable"})),
    }
}

/// Prometheus metrics
///
/// Every metric in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String,
            content_type = "text/plain"),
    )
)]
pub async fn metrics(state: State) -> HttpResponse {
    if let Ok(depth) = store::blocking(&state.pool, |conn| {
        store::mailbox::total(conn).map_err(ApiError::from)
    })
    .await
    {
        state.metrics.mailbox_depth.set(depth);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
