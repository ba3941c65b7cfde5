//! `/healthz`, `/readyz`, `/metrics`: unauthenticated, for the operator.

use actix_web::HttpResponse;

use crate::error::ApiError;
use crate::state::State;
use crate::store;

/// # `GET /healthz` — the process is alive.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// # `GET /readyz` — the database answers; 503 while draining or when it does not.
pub async fn readyz(state: State) -> HttpResponse {
    if state.is_draining() {
        return actix_web::ResponseError::error_response(&ApiError::Unavailable);
    }
    let ping = store::blocking(&state.pool, |conn| {
        store::with_conn!(conn, c => diesel::connection::SimpleConnection::batch_execute(c, "SELECT 1"))
            .map_err(|e| ApiError::from(store::StoreError::Query(e)))
    })
    .await;
    match ping {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Err(_) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"error": "unavailable", "message": "database unreachable"})),
    }
}

/// # `GET /metrics` — Prometheus text format.
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
