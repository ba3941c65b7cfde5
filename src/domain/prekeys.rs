//! Prekeys as courier keeps them, and the rules an upload must meet: every
//! key decoded and type-checked, every signature verified against the
//! identity key, key ids unique, bounded counts. Pure; CPU-bound (run
//! [`check_upload`] off the async executor).

use std::collections::BTreeSet;

use curve25519_dalek::montgomery::MontgomeryPoint;

use super::address::DeviceId;
use super::keys::{self as k, KeyError};

/// One-time keys of each kind (EC, PQ) one upload may carry.
pub const MAX_KEYS_PER_UPLOAD: usize = 100;

/// A key with a signature by the identity key (signed prekey, PQ keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKey {
    pub key_id: u32,
    pub public_key: Vec<u8>,
    pub signature: Vec<u8>,
}

/// An unsigned one-time EC prekey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneTimeKey {
    pub key_id: u32,
    pub public_key: Vec<u8>,
}

/// A checked upload: every key decoded and every signature verified.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub identity_key: Vec<u8>,
    pub signed_pre_key: Option<SignedKey>,
    pub pq_last_resort: Option<SignedKey>,
    pub one_time: Vec<OneTimeKey>,
    pub pq_one_time: Vec<SignedKey>,
}

/// Why storage refused an upload; nothing of it was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadRefusal {
    /// The identity key differs from the account's (or a linked device
    /// uploads before the primary set one).
    IdentityMismatch,
    /// More one-time keys than the per-device bound would be stored.
    TooManyKeys,
    /// A device's first upload must carry its signed prekey (only later
    /// uploads may leave fields out), or its bundle could never be built.
    MissingSignedPreKey,
}

/// One device's part of a prekey bundle.
#[derive(Debug, Clone)]
pub struct BundleDevice {
    pub device_id: DeviceId,
    pub registration_id: i32,
    pub signed_pre_key: SignedKey,
    pub pre_key: Option<OneTimeKey>,
    /// A one-time PQ key when one is left, else the last-resort key.
    pub pq_pre_key: Option<SignedKey>,
}

#[derive(Debug, Clone)]
pub struct Bundle {
    pub identity_key: Vec<u8>,
    pub devices: Vec<BundleDevice>,
}

/// An upload as the client wrote it: keys still base64 text (the wire layer
/// turns its JSON into this).
#[derive(Debug, Clone, Default)]
pub struct RawUpload {
    pub identity_key: String,
    pub signed_pre_key: Option<RawKey>,
    pub pq_last_resort: Option<RawKey>,
    pub pre_keys: Vec<RawKey>,
    pub pq_pre_keys: Vec<RawKey>,
}

/// One key as written; `signature` is empty for an unsigned one-time key.
#[derive(Debug, Clone, Default)]
pub struct RawKey {
    pub key_id: u32,
    pub public_key: String,
    pub signature: String,
}

/// Why an upload is refused before storage.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// `413`: more keys than one upload may carry.
    #[error(
        "at most {MAX_KEYS_PER_UPLOAD} preKeys and {MAX_KEYS_PER_UPLOAD} pqPreKeys per upload"
    )]
    TooMany,
    /// `400`: a key id appears twice in one list.
    #[error("{field}: keyId {id} appears twice")]
    DuplicateId { field: &'static str, id: u32 },
    /// `422`: a key or signature is malformed or does not verify.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Decodes and verifies a whole upload.
pub fn check_upload(upload: RawUpload) -> Result<KeySet, UploadError> {
    let pre_keys = upload.pre_keys;
    let pq_pre_keys = upload.pq_pre_keys;
    if pre_keys.len() > MAX_KEYS_PER_UPLOAD || pq_pre_keys.len() > MAX_KEYS_PER_UPLOAD {
        return Err(UploadError::TooMany);
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
    let signed = |field: &str, key: &RawKey, kyber: bool| -> Result<SignedKey, KeyError> {
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
        .pq_last_resort
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
        .collect::<Result<Vec<_>, KeyError>>()?;
    let pq_one_time = pq_pre_keys
        .iter()
        .enumerate()
        .map(|(i, p)| signed(&format!("pqPreKeys[{i}]"), p, true))
        .collect::<Result<Vec<_>, KeyError>>()?;
    Ok(KeySet {
        identity_key: identity.to_vec(),
        signed_pre_key,
        pq_last_resort,
        one_time,
        pq_one_time,
    })
}

fn unique_ids(field: &'static str, ids: impl Iterator<Item = u32>) -> Result<(), UploadError> {
    let mut seen = BTreeSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(UploadError::DuplicateId { field, id });
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
