//! `GET /v1/openapi.json`: the OpenAPI 3 description of every route, generated
//! from the handlers' `#[utoipa::path]` attributes and the `ToSchema` bodies in
//! `wire`, so it cannot drift from them. `tests/openapi.rs` checks that it
//! lists every route of [`super::configure`].

use std::sync::OnceLock;

use actix_web::http::header::ContentType;
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToResponse};

use super::{accounts, certificates, devices, keys, messages, ops, push, rendezvous, websocket};
use crate::error::ErrorBody;

/// The name of the HTTP Basic scheme in the document.
pub const BASIC: &str = "basic";
/// The name of the sealed-sender scheme (`Unidentified-Access-Key`).
pub const UNIDENTIFIED: &str = "unidentified";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "courier",
        description = "A realtime message broker for Signal-protocol messengers. \
            WebSocket frames, delivery guarantees and close codes: docs/protocol.md."
    ),
    paths(
        ops::healthz,
        ops::readyz,
        ops::metrics,
        accounts::register,
        accounts::delete_account,
        devices::create_provisioning_code,
        devices::link_device,
        devices::list_devices,
        devices::delete_device,
        keys::put_keys,
        keys::get_key_count,
        keys::get_bundle,
        messages::send_messages,
        messages::send_multi_recipient,
        messages::ack_message,
        messages::get_messages,
        websocket::connect,
        rendezvous::create_channel,
        rendezvous::join_channel,
        push::get_vapid_key,
        push::put_subscription,
        push::delete_subscription,
        certificates::trust_root,
        certificates::delivery,
        accounts::set_attributes,
        openapi_json,
    ),
    components(responses(Unauthorized, RateLimited, Internal)),
    modifiers(&BasicAuth),
)]
pub struct ApiDoc;

/// Declares the HTTP Basic scheme the operations' `security(("basic" = []))` name.
struct BasicAuth;

impl Modify for BasicAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut scheme = Http::new(HttpAuthScheme::Basic);
        scheme.description = Some(
            "Username `UUID.DEVICE` (or `UUID` for device 1), password the device's secret.".into(),
        );
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(BASIC, SecurityScheme::Http(scheme));
        components.add_security_scheme(
            UNIDENTIFIED,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Unidentified-Access-Key",
                "Sealed sender: the destination account's 16-byte unidentified-access key, base64.",
            ))),
        );
    }
}

/// Missing, malformed or wrong credentials, or a device or account that does
/// not exist (any more): all the same answer.
#[derive(ToResponse)]
#[response(headers(("WWW-Authenticate" = String, description = "`Basic realm=\"courier\"`")))]
#[allow(dead_code)]
pub struct Unauthorized(ErrorBody);

/// A rate limit: failed authentications per client IP (then every
/// authenticated request from it), or the operation's own limit.
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds until a retry can succeed")))]
#[allow(dead_code)]
pub struct RateLimited(ErrorBody);

/// A storage or internal failure (`internal_error`); the cause is only logged.
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct Internal(ErrorBody);

/// The document, built once.
pub fn document() -> &'static Bytes {
    static DOCUMENT: OnceLock<Bytes> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serialises")
            .into()
    })
}

/// This OpenAPI document
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "ops",
    responses(
        (status = 200, description = "The OpenAPI 3 document", body = Object),
    )
)]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(ContentType::json())
        .body(document().clone())
}
