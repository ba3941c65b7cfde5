//! A key upload (`PUT /v1/keys`): deserialised, then `check_upload` (base64, lengths, type bytes,
//! XEdDSA signatures, per-upload limits). An accepted upload holds only well-formed keys; a
//! refused one is a 4xx.

#![no_main]

use courier::domain::keys::{EC_KEY_LEN, EC_TYPE, KYBER_KEY_LEN, KYBER_TYPE, SIGNATURE_LEN};
use courier::domain::prekeys::SignedKey;
use courier::domain::prekeys::{check_upload, MAX_KEYS_PER_UPLOAD};
use courier::wire::KeyUpload;
use libfuzzer_sys::fuzz_target;

fn signed(key: &SignedKey, len: usize, key_type: u8) {
    assert_eq!(key.public_key.len(), len);
    assert_eq!(key.public_key[0], key_type);
    assert_eq!(key.signature.len(), SIGNATURE_LEN);
}

fuzz_target!(|data: &[u8]| {
    let Ok(upload) = serde_json::from_slice::<KeyUpload>(data) else {
        return;
    };
    match check_upload(upload.into()) {
        Ok(keys) => {
            assert_eq!(keys.identity_key.len(), EC_KEY_LEN);
            assert_eq!(keys.identity_key[0], EC_TYPE);
            if let Some(k) = &keys.signed_pre_key {
                signed(k, EC_KEY_LEN, EC_TYPE);
            }
            if let Some(k) = &keys.pq_last_resort {
                signed(k, KYBER_KEY_LEN, KYBER_TYPE);
            }
            assert!(keys.one_time.len() <= MAX_KEYS_PER_UPLOAD);
            assert!(keys.pq_one_time.len() <= MAX_KEYS_PER_UPLOAD);
            for k in &keys.one_time {
                assert_eq!(k.public_key.len(), EC_KEY_LEN);
                assert_eq!(k.public_key[0], EC_TYPE);
            }
            for k in &keys.pq_one_time {
                signed(k, KYBER_KEY_LEN, KYBER_TYPE);
            }
        }
        Err(e) => {
            let e = courier::error::ApiError::from(e);
            assert!(e.status().is_client_error(), "{e:?} is not a 4xx");
            let body = e.body();
            assert!(body["error"].is_string() && body["message"].is_string());
        }
    }
});
