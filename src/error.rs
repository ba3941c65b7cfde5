//! `ApiError`: every answer the SPEC allows other than success, in one place.
//!
//! `status()` and `code()` are the only mapping from errors to HTTP statuses
//! and stable error codes; HTTP responses and WebSocket `response` frames are
//! both built from [`ApiError::body`], so the two can never disagree.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Map, Value};

use crate::domain::address::AccountId;
use crate::domain::keys::KeyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("the identity key differs from the account's")]
    IdentityKeyMismatch,
    #[error("the account has no identity key yet")]
    NoIdentityKey,
    #[error("this rendezvous channel already has its two sides")]
    ChannelFull,
    #[error("the destination device set is not current")]
    MismatchedDevices { missing: Vec<u32>, extra: Vec<u32> },
    #[error("some destination devices have re-registered")]
    StaleDevices { stale: Vec<u32> },
    /// A multi-recipient send: the accounts whose device sets are not current.
    #[error("the device sets of some recipients are not current")]
    MultiMismatched(Vec<AccountDevices>),
    /// A multi-recipient send: the accounts with re-registered devices.
    #[error("some recipients' devices have re-registered")]
    MultiStale(Vec<AccountDevices>),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    InvalidKey(#[from] KeyError),
    /// The path exists but does not serve this method; `allow` lists those it does.
    #[error("this path serves {allow} only")]
    MethodNotAllowed { allow: String },
    #[error("too many requests")]
    RateLimited { retry_after_secs: u64 },
    #[error("the destination mailbox is full")]
    MailboxFull,
    #[error("the server is shutting down")]
    Unavailable,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::IdentityKeyMismatch
            | ApiError::NoIdentityKey
            | ApiError::ChannelFull
            | ApiError::MismatchedDevices { .. }
            | ApiError::MultiMismatched(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::StaleDevices { .. } | ApiError::MultiStale(_) => StatusCode::GONE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidKey(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::MailboxFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable, documented error codes: part of the contract.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::IdentityKeyMismatch => "identity_key_mismatch",
            ApiError::NoIdentityKey => "no_identity_key",
            ApiError::ChannelFull => "channel_full",
            ApiError::MismatchedDevices { .. } | ApiError::MultiMismatched(_) => {
                "mismatched_devices"
            }
            ApiError::StaleDevices { .. } | ApiError::MultiStale(_) => "stale_devices",
            ApiError::TooLarge(_) => "too_large",
            ApiError::InvalidKey(_) => "invalid_key",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::MailboxFull => "mailbox_full",
            ApiError::Unavailable => "unavailable",
            ApiError::Internal => "internal_error",
        }
    }

    /// `{"error", "message", …extras}` — identical over HTTP and WebSocket;
    /// for a refused multi-recipient send, the SPEC's list of accounts
    /// instead (as Signal-Server answers it).
    pub fn body(&self) -> Value {
        if let ApiError::MultiMismatched(accounts) | ApiError::MultiStale(accounts) = self {
            return json!(accounts);
        }
        let mut body = Map::new();
        body.insert("error".into(), json!(self.code()));
        body.insert("message".into(), json!(self.to_string()));
        match self {
            ApiError::MismatchedDevices { missing, extra } => {
                body.insert("missingDevices".into(), json!(missing));
                body.insert("extraDevices".into(), json!(extra));
            }
            ApiError::StaleDevices { stale } => {
                body.insert("staleDevices".into(), json!(stale));
            }
            ApiError::RateLimited { retry_after_secs } => {
                body.insert("retryAfter".into(), json!(retry_after_secs));
            }
            _ => {}
        }
        Value::Object(body)
    }
}

/// One account of a refused multi-recipient send: `{uuid, devices: {…}}`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AccountDevices {
    #[schema(format = Uuid)]
    uuid: String,
    /// `{missingDevices, extraDevices}` (409) or `{staleDevices}` (410).
    #[schema(value_type = Object)]
    devices: Value,
}

impl AccountDevices {
    pub fn mismatched(account: AccountId, missing: Vec<u32>, extra: Vec<u32>) -> Self {
        AccountDevices {
            uuid: account.to_string(),
            devices: json!({"missingDevices": missing, "extraDevices": extra}),
        }
    }

    pub fn stale(account: AccountId, stale: Vec<u32>) -> Self {
        AccountDevices {
            uuid: account.to_string(),
            devices: json!({"staleDevices": stale}),
        }
    }
}

// The OpenAPI document's `ErrorBody`: what `ApiError::body` writes, for the
// schema only (never built). `tests/openapi.rs` checks the two agree.
/// The body of every error answer, over HTTP and in WebSocket `response` frames.
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct ErrorBody {
    #[schema(schema_with = error_code_schema)]
    error: String,
    /// Text for humans; it may change.
    message: String,
    /// `409 mismatched_devices`: current devices the send has no copy for.
    #[schema(required = false)]
    missing_devices: Vec<u32>,
    /// `409 mismatched_devices`: addressed devices the account does not have.
    #[schema(required = false)]
    extra_devices: Vec<u32>,
    /// `410 stale_devices`: devices whose registration id has changed.
    #[schema(required = false)]
    stale_devices: Vec<u32>,
    /// `429 rate_limited`: seconds until a retry can succeed (also `Retry-After`).
    #[schema(required = false)]
    retry_after: u64,
}

/// `error` is one of the codes [`ApiError::code`] gives.
fn error_code_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use ApiError::*;
    let every = [
        BadRequest(String::new()),
        Unauthorized,
        Forbidden(""),
        NotFound(""),
        IdentityKeyMismatch,
        NoIdentityKey,
        ChannelFull,
        MismatchedDevices {
            missing: Vec::new(),
            extra: Vec::new(),
        },
        StaleDevices { stale: Vec::new() },
        MultiMismatched(Vec::new()),
        MultiStale(Vec::new()),
        TooLarge(String::new()),
        InvalidKey(KeyError::Signature {
            field: String::new(),
        }),
        MethodNotAllowed {
            allow: String::new(),
        },
        RateLimited {
            retry_after_secs: 0,
        },
        MailboxFull,
        Unavailable,
        Internal,
    ];
    // Exhaustive on purpose: a new variant breaks this match until it is listed
    // above too (tests/openapi.rs also counts the codes).
    for e in &every {
        match e {
            BadRequest(_) | Unauthorized | Forbidden(_) | NotFound(_) | IdentityKeyMismatch => {}
            ChannelFull | NoIdentityKey => {}
            MismatchedDevices { .. } | StaleDevices { .. } | TooLarge(_) | InvalidKey(_) => {}
            MultiMismatched(_) | MultiStale(_) => {}
            MethodNotAllowed { .. } | RateLimited { .. } | MailboxFull | Unavailable | Internal => {
            }
        }
    }
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(
            every
                .iter()
                .map(ApiError::code)
                .enumerate()
                .filter(|(i, code)| !every[..*i].iter().any(|e| e.code() == *code))
                .map(|(_, code)| code),
        ))
        .description(Some(
            "Stable error code: program against it and the status.",
        ))
        .build()
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status());
        if let ApiError::RateLimited { retry_after_secs } = self {
            response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
        }
        if let ApiError::MethodNotAllowed { allow } = self {
            response.insert_header((header::ALLOW, allow.as_str()));
        }
        if let ApiError::Unauthorized = self {
            response.insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"courier\""));
        }
        response.json(self.body())
    }
}

/// Storage faults are logged with their cause here and reach the client only
/// as a generic `internal_error` (never a 400, never the SQL text).
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        log::error!("storage error: {e}");
        ApiError::Internal
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        log::error!("blocking thread pool is gone");
        ApiError::Internal
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        log::error!("actor unavailable: {e}");
        ApiError::Internal
    }
}
