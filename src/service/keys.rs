//! Key distribution: uploads (checked by `domain::prekeys`, stored by the
//! `KeysActor`), counts, and bundles turned into their JSON form.

use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::prekeys::{check_upload, SignedKey, UploadError, UploadRefusal};
use crate::error::ApiError;
use crate::service::state::State;
use crate::wire::{self, b64, BundleResponse, KeyCount, KeyUpload};

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::TooMany => ApiError::TooLarge(e.to_string()),
            UploadError::DuplicateId { .. } => ApiError::bad_request(e.to_string()),
            UploadError::Key(k) => k.into(),
        }
    }
}

/// `PUT /v1/keys`: all of it stored, or (on any error) nothing.
pub async fn upload(state: &State, device: Address, upload: KeyUpload) -> Result<(), ApiError> {
    let keys = actix_web::web::block(move || check_upload(upload.into())).await??;
    match state.keys.store(device, keys).await? {
        Ok(()) => Ok(()),
        Err(UploadRefusal::IdentityMismatch) => Err(ApiError::IdentityKeyMismatch),
        Err(UploadRefusal::MissingSignedPreKey) => Err(ApiError::bad_request(
            "signedPreKey is required on a device's first upload",
        )),
        Err(UploadRefusal::TooManyKeys) => Err(ApiError::TooLarge(format!(
            "a device may store at most {} one-time keys of each kind",
            state.config.max_one_time_keys
        ))),
    }
}

/// `GET /v1/keys/count`.
pub async fn count(state: &State, device: Address) -> Result<KeyCount, ApiError> {
    let (count, pq_count) = state.keys.count(device).await?;
    Ok(KeyCount { count, pq_count })
}

/// `GET /v1/keys/{uuid}/{deviceId|*}`: consumes one one-time key of each
/// kind per device in the bundle.
pub async fn bundle(
    state: &State,
    requester: Address,
    target: &str,
    device: &str,
) -> Result<BundleResponse, ApiError> {
    let account: AccountId = target
        .parse()
        .map_err(|_| ApiError::NotFound("no such account"))?;
    let device = match device {
        "*" => None,
        d => Some(
            d.parse::<DeviceId>()
                .map_err(|_| ApiError::NotFound("no such device"))?,
        ),
    };
    state
        .limits
        .bundle_fetch(requester.account, account)
        .await?;
    let bundle = state
        .keys
        .take(account, device)
        .await?
        .ok_or(ApiError::NotFound("no keys for that account or device"))?;
    state.metrics.bundle_fetches.inc();
    let issued = |kind: &str, n: usize| {
        state
            .metrics
            .one_time_keys_issued
            .with_label_values(&[kind])
            .inc_by(n as u64)
    };
    issued(
        "ec",
        bundle
            .devices
            .iter()
            .filter(|d| d.pre_key.is_some())
            .count(),
    );
    Ok(BundleResponse {
        identity_key: b64(&bundle.identity_key),
        devices: bundle
            .devices
            .into_iter()
            .map(|d| wire::BundleDevice {
                device_id: d.device_id.0,
                registration_id: d.registration_id,
                signed_pre_key: signed_json(d.signed_pre_key),
                pre_key: d.pre_key.map(|p| wire::PreKey {
                    key_id: p.key_id,
                    public_key: b64(&p.public_key),
                }),
                pq_pre_key: d.pq_pre_key.map(signed_json),
            })
            .collect(),
    })
}

fn signed_json(k: SignedKey) -> wire::SignedPreKey {
    wire::SignedPreKey {
        key_id: k.key_id,
        public_key: b64(&k.public_key),
        signature: b64(&k.signature),
    }
}
