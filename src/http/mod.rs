//! Thin HTTP handlers: extract → call a service → JSON. One file per SPEC
//! resource; the whole route table is [`configure`].

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{error, web, HttpRequest, HttpResponse, Resource, Route};

use crate::error::ApiError;
use crate::service::state::State;

pub mod accounts;
pub mod auth;
pub mod certificates;
pub mod devices;
pub mod keys;
pub mod messages;
pub mod openapi;
pub mod ops;
pub mod push;
pub mod rendezvous;
pub mod websocket;

/// Default JSON body limit.
const JSON_LIMIT: usize = 64 * 1024;
/// `PUT /v1/keys`: 100 EC + 100 signed Kyber one-time keys fit with room.
const KEYS_JSON_LIMIT: usize = 1024 * 1024;
/// `PUT /v1/messages`: one ≤256 KiB copy per device, base64.
const MESSAGES_JSON_LIMIT: usize = crate::wire::MAX_SEND_BYTES;

pub fn configure(cfg: &mut web::ServiceConfig) {
    use Method as M;
    cfg.app_data(json_config(JSON_LIMIT))
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| ApiError::bad_request(format!("bad path: {e}")).into()),
        )
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| ApiError::bad_request(format!("bad query: {e}")).into()),
        )
        .service(resource("/healthz", [(M::GET, web::to(ops::healthz))]))
        .service(resource("/readyz", [(M::GET, web::to(ops::readyz))]))
        .service(resource("/metrics", [(M::GET, web::to(ops::metrics))]))
        .service(resource(
            "/v1/accounts",
            [(M::POST, web::to(accounts::register))],
        ))
        .service(resource(
            "/v1/accounts/me",
            [(M::DELETE, web::to(accounts::delete_account))],
        ))
        .service(resource(
            "/v1/accounts/attributes",
            [(M::PUT, web::to(accounts::set_attributes))],
        ))
        .service(resource(
            "/v1/certificate/trust-root",
            [(M::GET, web::to(certificates::trust_root))],
        ))
        .service(resource(
            "/v1/certificate/delivery",
            [(M::GET, web::to(certificates::delivery))],
        ))
        .service(resource(
            "/v1/devices/provisioning",
            [(M::POST, web::to(devices::create_provisioning_code))],
        ))
        .service(resource(
            "/v1/devices",
            [
                (M::POST, web::to(devices::link_device)),
                (M::GET, web::to(devices::list_devices)),
            ],
        ))
        .service(resource(
            "/v1/devices/{device_id}",
            [(M::DELETE, web::to(devices::delete_device))],
        ))
        .service(
            resource("/v1/keys", [(M::PUT, web::to(keys::put_keys))])
                .app_data(json_config(KEYS_JSON_LIMIT)),
        )
        .service(resource(
            "/v1/keys/count",
            [(M::GET, web::to(keys::get_key_count))],
        ))
        .service(resource(
            "/v1/keys/{uuid}/{device_id}",
            [(M::GET, web::to(keys::get_bundle))],
        ))
        .service(resource(
            "/v1/messages/multi_recipient",
            [(M::PUT, web::to(messages::send_multi_recipient))],
        ))
        .service(
            resource(
                "/v1/messages/{uuid}",
                [
                    (M::PUT, web::to(messages::send_messages)),
                    (M::DELETE, web::to(messages::ack_message)),
                ],
            )
            .app_data(json_config(MESSAGES_JSON_LIMIT)),
        )
        .service(resource(
            "/v1/messages",
            [(M::GET, web::to(messages::get_messages))],
        ))
        .service(resource(
            "/v1/websocket",
            [(M::GET, web::to(websocket::connect))],
        ))
        .service(resource(
            "/v1/rendezvous",
            [(M::POST, web::to(rendezvous::create_channel))],
        ))
        .service(resource(
            "/v1/rendezvous/{channel}",
            [(M::GET, web::to(rendezvous::join_channel))],
        ))
        .service(resource(
            "/v1/push/vapid-key",
            [(M::GET, web::to(push::get_vapid_key))],
        ))
        .service(resource(
            "/v1/push",
            [
                (M::PUT, web::to(push::put_subscription)),
                (M::DELETE, web::to(push::delete_subscription)),
            ],
        ))
        .service(resource(
            "/v1/openapi.json",
            [(M::GET, web::to(openapi::openapi_json))],
        ));
}

/// `path` served by `routes`; any other method is answered `405` with the
/// `Allow` header listing the methods it does serve (RFC 9110 §15.5.6).
fn resource<const N: usize>(path: &str, routes: [(Method, Route); N]) -> Resource {
    let allow = routes
        .iter()
        .map(|(method, _)| method.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let resource = routes
        .into_iter()
        .fold(web::resource(path), |resource, (method, route)| {
            resource.route(route.method(method))
        });
    resource.default_service(web::to(move || {
        let allow = allow.clone();
        async move { Err::<HttpResponse, _>(ApiError::MethodNotAllowed { allow }) }
    }))
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

/// Unknown paths: the SPEC's error body, not an empty 404. (A known path
/// with a method it does not serve is `405`: see [`resource`].)
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
