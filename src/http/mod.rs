//! Thin HTTP handlers: extract → call a service → JSON. One file per SPEC
//! resource; the whole route table is [`configure`].

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{error, web, HttpRequest, HttpResponse};

use crate::error::ApiError;
use crate::state::State;

pub mod accounts;
pub mod auth;
pub mod devices;
pub mod keys;
pub mod messages;
pub mod ops;
pub mod websocket;

/// Default JSON body limit.
const JSON_LIMIT: usize = 64 * 1024;
/// `PUT /v1/keys`: 100 EC + 100 signed Kyber one-time keys fit with room.
const KEYS_JSON_LIMIT: usize = 1024 * 1024;
/// `PUT /v1/messages`: one ≤256 KiB copy per device, base64.
const MESSAGES_JSON_LIMIT: usize = crate::wire::MAX_SEND_BYTES;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(json_config(JSON_LIMIT))
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| ApiError::bad_request(format!("bad path: {e}")).into()),
        )
        .route("/healthz", web::get().to(ops::healthz))
        .route("/readyz", web::get().to(ops::readyz))
        .route("/metrics", web::get().to(ops::metrics))
        .route("/v1/accounts", web::post().to(accounts::register))
        .route(
            "/v1/accounts/me",
            web::delete().to(accounts::delete_account),
        )
        .route(
            "/v1/devices/provisioning",
            web::post().to(devices::create_provisioning_code),
        )
        .route("/v1/devices", web::post().to(devices::link_device))
        .route("/v1/devices", web::get().to(devices::list_devices))
        .route(
            "/v1/devices/{device_id}",
            web::delete().to(devices::delete_device),
        )
        .service(
            web::resource("/v1/keys")
                .app_data(json_config(KEYS_JSON_LIMIT))
                .route(web::put().to(keys::put_keys)),
        )
        .route("/v1/keys/count", web::get().to(keys::get_key_count))
        .route(
            "/v1/keys/{uuid}/{device_id}",
            web::get().to(keys::get_bundle),
        )
        .service(
            web::resource("/v1/messages/{uuid}")
                .app_data(json_config(MESSAGES_JSON_LIMIT))
                .route(web::put().to(messages::send_messages))
                .route(web::delete().to(messages::ack_message)),
        )
        .route("/v1/messages", web::get().to(messages::get_messages))
        .route("/v1/websocket", web::get().to(websocket::connect));
}

/// JSON bodies: a size limit, and every failure as the SPEC's error body
/// (413 for too large, 400 for anything else).
fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|e, _req: &HttpRequest| {
            let api = match &e {
                error::JsonPayloadError::Overflow { .. }
                | error::JsonPayloadError::OverflowKnownLength { .. } => {
                    ApiError::TooLarge("request body too large".into())
                }
                error::JsonPayloadError::ContentType => {
                    ApiError::bad_request("Content-Type must be application/json")
                }
                error::JsonPayloadError::Deserialize(d) => {
                    ApiError::bad_request(format!("invalid JSON body: {d}"))
                }
                other => ApiError::bad_request(format!("invalid body: {other}")),
            };
            api.into()
        })
}

/// Unknown paths and methods: the SPEC's error body, not an empty 404.
pub async fn not_found() -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::NotFound("no such endpoint"))
}

/// Counts and times every request by route template (never the raw path,
/// which carries account ids).
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let state = req.app_data::<State>().cloned();
    let method = req.method().to_string();
    let res = next.call(req).await?;
    if let Some(state) = state {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        let status = res.status().as_u16().to_string();
        state
            .metrics
            .http_requests
            .with_label_values(&[&method, &route, &status])
            .inc();
        state
            .metrics
            .http_latency
            .with_label_values(&[&method, &route])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}
