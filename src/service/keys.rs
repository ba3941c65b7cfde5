//! Key distribution: checking uploads (decoding, XEdDSA signatures, limits)
//! and turning stored keys into the SPEC's bundle. All prekey storage goes
//! through the `KeysActor`.

use std::collections::BTreeSet;

use curve25519_dalek::montgomery::MontgomeryPoint;

use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::keys::{self as k, KeyError};
use crate::error::ApiError;
use crate::state::State;
use crate::store::keys::{KeySet, OneTimeKey, SignedKey, UploadRefusal};
use crate::wire::{self, b64, BundleResponse, KeyCount, KeyUpload};

/// One-time keys of each kind (EC, PQ) one upload may carry.
pub const MAX_KEYS_PER_UPLOAD: usize = 100;

/// Decodes and verifies a whole upload (pure, CPU-bound: run it off the executor).
pub fn check_upload(upload: KeyUpload) -> Result<KeySet, ApiError> {
    let pre_keys = upload.pre_keys.unwrap_or_default();
    let pq_pre_keys = upload.pq_pre_keys.unwrap_or_default();
    if pre_keys.len() > MAX_KEYS_PER_UPLOAD || pq_pre_keys.len() > MAX_KEYS_PER_UPLOAD {
        return Err(ApiError::TooLarge(format!(
            "at most {MAX_KEYS_PER_UPLOAD} preKeys and {MAX_KEYS_PER_UPLOAD} pqPreKeys per upload"
        )));
    }
    unique_ids("preKeys", pre_keys.iter().map(|p| p.key_id))?;
    unique_ids("pqPreKeys", pq_pre_keys.iter().map(|p| p.key_id))?;

    let identity = k::ec_public_key("identityKey", &upload.identity_key)?;
    if !usable_identity(&identity) {
        // Beyond libsignal: a low-order identity key makes forged signatures
        // trivial, so it is refused outright.
        return Err(KeyError::Signature {
            field: "identityKey".into(),
        }
        .into());
    }
    let signed =
        |field: &str, key: &wire::SignedPreKey, kyber: bool| -> Result<SignedKey, ApiError> {
            let public_key = if kyber {
                k::check_signed_kyber_key(&identity, field, &key.public_key, &key.signature)?
            } else {
                k::check_signed_ec_key(&identity, field, &key.public_key, &key.signature)?.to_vec()
            };
            Ok(SignedKey {
                key_id: key.key_id,
                public_key,
                signature: k::signature(field, &key.signature)?.to_vec(),
            })
        };
    let signed_pre_key = upload
        .signed_pre_key
        .as_ref()
        .map(|s| signed("signedPreKey", s, false))
        .transpose()?;
    let pq_last_resort = upload
        .pq_last_resort_pre_key
        .as_ref()
        .map(|s| signed("pqLastResortPreKey", s, true))
        .transpose()?;
    let one_time = pre_keys
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(OneTimeKey {
                key_id: p.key_id,
                public_key: k::ec_public_key(&format!("preKeys[{i}].publicKey"), &p.public_key)?
                    .to_vec(),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let pq_one_time = pq_pre_keys
        .iter()
        .enumerate()
        .map(|(i, p)| signed(&format!("pqPreKeys[{i}]"), p, true))
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(KeySet {
        identity_key: identity.to_vec(),
        signed_pre_key,
        pq_last_resort,
        one_time,
        pq_one_time,
    })
}

fn unique_ids(field: &str, ids: impl Iterator<Item = u32>) -> Result<(), ApiError> {
    let mut seen = BTreeSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(ApiError::bad_request(format!(
                "{field}: keyId {id} appears twice"
            )));
        }
    }
    Ok(())
}

/// The identity key must be a Curve25519 point of large order.
fn usable_identity(key: &[u8; k::EC_KEY_LEN]) -> bool {
    let mut u = [0u8; 32];
    u.copy_from_slice(&key[1..]);
    MontgomeryPoint(u)
        .to_edwards(0)
        .is_some_and(|p| !p.is_small_order())
}

/// `PUT /v1/keys`: all of it stored, or (on any error) nothing.
pub async fn upload(state: &State, device: Address, upload: KeyUpload) -> Result<(), ApiError> {
    let keys = actix_web::web::block(move || check_upload(upload)).await??;
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
    state.limits.bundle_fetch(requester.account, account)?;
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
