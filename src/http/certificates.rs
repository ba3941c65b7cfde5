//! `/v1/certificate`: sealed-sender certificates (SPEC "Sealed sender").

use actix_web::HttpResponse;

use super::auth::Authenticated;
use super::openapi::{Internal, RateLimited, Unauthorized};
use crate::error::{ApiError, ErrorBody};
use crate::service::certificates;
use crate::service::state::State;
use crate::wire::{DeliveryCertificate, TrustRoot};

/// The trust root
///
/// The public key every sender certificate chains to. Self-hosters' clients
/// fetch it once; real apps pin it.
#[utoipa::path(
    get,
    path = "/v1/certificate/trust-root",
    tag = "certificates",
    responses(
        (status = 200, description = "The trust root's public key", body = TrustRoot),
    )
)]
pub async fn trust_root(state: State) -> HttpResponse {
    HttpResponse::Ok().json(TrustRoot {
        public_key: state.certificates.trust_root_base64(),
    })
}

/// A sender certificate
///
/// A libsignal `SenderCertificate` for the calling device: its account,
/// device id and the account's identity key, signed by the server key with
/// the server certificate embedded, valid for
/// `sender_certificate_hours`. Senders put it inside their sealed-sender
/// messages, where only the recipient reads it.
#[utoipa::path(
    get,
    path = "/v1/certificate/delivery",
    tag = "certificates",
    security(("basic" = [])),
    responses(
        (status = 200, description = "The certificate", body = DeliveryCertificate),
        (status = 401, response = Unauthorized),
        (status = 409, description = "The account has no identity key yet (no_identity_key)", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn delivery(state: State, auth: Authenticated) -> Result<HttpResponse, ApiError> {
    let certificate = certificates::delivery(&state, auth.0).await?;
    Ok(HttpResponse::Ok().json(certificate))
}
