//! Key material exactly as libsignal serialises it: standard base64 (with padding) decoding,
//! length and type-byte checks for Curve25519 and Kyber public keys, and XEdDSA verification of
//! the signatures that tie signed prekeys to an account's identity key.
//!
//! Pure functions only: no I/O, no logging. Nothing here panics on any input, and no error
//! message ever contains key or signature bytes, only the JSON field name and lengths.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use curve25519_dalek::edwards::EdwardsPoint;
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::Scalar;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// A serialised Curve25519 public key: type byte [`EC_TYPE`] + 32-byte Montgomery u.
pub const EC_KEY_LEN: usize = 33;
/// A serialised Kyber1024 public key: type byte [`KYBER_TYPE`] + 1568 bytes.
pub const KYBER_KEY_LEN: usize = 1569;
/// An XEdDSA signature: R (32 bytes) || s (32 bytes, top bit carries the Edwards sign bit).
pub const SIGNATURE_LEN: usize = 64;
/// libsignal's type byte for a Curve25519 ("Djb") public key.
pub const EC_TYPE: u8 = 0x05;
/// libsignal's type byte for a Kyber1024 public key.
pub const KYBER_TYPE: u8 = 0x08;

/// The longest base64 string looked at: the padded encoding of the largest key, plus one spare
/// quantum. Anything longer is refused before it is decoded.
pub const MAX_BASE64_LEN: usize = 4 * KYBER_KEY_LEN.div_ceil(3) + 4;

/// Why a piece of key material was refused. `field` is the JSON path of the offending value,
/// e.g. `identityKey`, `signedPreKey.publicKey` or `preKeys[3].publicKey`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not standard-alphabet base64 with canonical padding.
    #[error("{field} is not standard base64 with padding")]
    Base64 { field: String },
    /// Wrong length. Counts decoded bytes, except when the base64 text itself is longer than
    /// [`MAX_BASE64_LEN`]: then both numbers count base64 characters.
    #[error("{field} has the wrong length: expected {expected}, got {actual}")]
    Length {
        field: String,
        expected: usize,
        actual: usize,
    },
    /// The leading type byte is not the one this kind of key must have.
    #[error("{field} has key type {actual:#04x}, expected {expected:#04x}")]
    KeyType {
        field: String,
        expected: u8,
        actual: u8,
    },
    /// The signature does not verify against the identity key.
    #[error("{field} does not verify against the identity key")]
    Signature { field: String },
}

/// Decodes standard base64 with padding required; URL-safe alphabet, missing or extra padding,
/// non-zero trailing bits and whitespace are all refused. Text longer than [`MAX_BASE64_LEN`]
/// is refused as [`KeyError::Length`] without being decoded.
pub fn decode_base64(field: &str, s: &str) -> Result<Vec<u8>, KeyError> {
    if s.len() > MAX_BASE64_LEN {
        return Err(KeyError::Length {
            field: field.to_owned(),
            expected: MAX_BASE64_LEN,
            actual: s.len(),
        });
    }
    STANDARD.decode(s).map_err(|_| KeyError::Base64 {
        field: field.to_owned(),
    })
}

/// Decodes `s` and checks it is exactly `len` bytes.
fn decode_exact(field: &str, s: &str, len: usize) -> Result<Vec<u8>, KeyError> {
    let bytes = decode_base64(field, s)?;
    if bytes.len() != len {
        return Err(KeyError::Length {
            field: field.to_owned(),
            expected: len,
            actual: bytes.len(),
        });
    }
    Ok(bytes)
}

/// Checks the leading type byte of an already length-checked key.
fn check_type(field: &str, bytes: &[u8], expected: u8) -> Result<(), KeyError> {
    match bytes.first() {
        Some(&actual) if actual == expected => Ok(()),
        actual => Err(KeyError::KeyType {
            field: field.to_owned(),
            expected,
            actual: actual.copied().unwrap_or_default(),
        }),
    }
}

/// Decodes a serialised Curve25519 public key: 33 bytes, type byte `0x05`.
pub fn ec_public_key(field: &str, s: &str) -> Result<[u8; EC_KEY_LEN], KeyError> {
    let bytes = decode_exact(field, s, EC_KEY_LEN)?;
    check_type(field, &bytes, EC_TYPE)?;
    let mut key = [0u8; EC_KEY_LEN];
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Decodes a serialised Kyber1024 public key: 1569 bytes, type byte `0x08`.
pub fn kyber_public_key(field: &str, s: &str) -> Result<Vec<u8>, KeyError> {
    let bytes = decode_exact(field, s, KYBER_KEY_LEN)?;
    check_type(field, &bytes, KYBER_TYPE)?;
    Ok(bytes)
}

/// Decodes a 64-byte XEdDSA signature (not verified here).
pub fn signature(field: &str, s: &str) -> Result<[u8; SIGNATURE_LEN], KeyError> {
    let bytes = decode_exact(field, s, SIGNATURE_LEN)?;
    let mut sig = [0u8; SIGNATURE_LEN];
    sig.copy_from_slice(&bytes);
    Ok(sig)
}

/// Verifies an XEdDSA signature the way libsignal's `curve25519::PrivateKey::verify_signature`
/// does, including its one deviation from the XEdDSA paper: the Edwards sign bit travels in the
/// top bit of the signature's last byte. `message` is what was signed; for Signal prekeys that
/// is the whole serialised public key, type byte included. An identity key whose type byte is
/// not `0x05` never verifies. Like libsignal, low-order identity keys are not refused (see the
/// `hostile_points_and_scalars_never_panic` test); real clients never produce them.
pub fn verify_xeddsa(
    identity_key: &[u8; EC_KEY_LEN],
    message: &[u8],
    signature: &[u8; SIGNATURE_LEN],
) -> bool {
    let [key_type, u @ ..] = identity_key;
    if *key_type != EC_TYPE {
        return false;
    }
    let (cap_r, s_bytes) = signature.split_at(32);

    let sign_bit = (signature[SIGNATURE_LEN - 1] & 0x80) >> 7;
    let Some(a_point) = MontgomeryPoint(*u).to_edwards(sign_bit) else {
        return false;
    };
    let cap_a = a_point.compress();

    let mut s = [0u8; 32];
    s.copy_from_slice(s_bytes);
    s[31] &= 0x7F;
    if s[31] & 0xE0 != 0 {
        return false;
    }

    let h = Scalar::from_hash(
        Sha512::new()
            .chain_update(cap_r)
            .chain_update(cap_a.as_bytes())
            .chain_update(message),
    );
    let cap_r_check = EdwardsPoint::vartime_double_scalar_mul_basepoint(
        &h,
        &-a_point,
        &Scalar::from_bytes_mod_order(s),
    )
    .compress();

    cap_r_check.as_bytes()[..].ct_eq(cap_r).into()
}

/// Decodes `{field}.publicKey` (Curve25519) and `{field}.signature`, and checks the signature
/// was made by `identity_key` over the serialised public key. Returns the decoded key.
pub fn check_signed_ec_key(
    identity_key: &[u8; EC_KEY_LEN],
    field: &str,
    public_key_b64: &str,
    signature_b64: &str,
) -> Result<[u8; EC_KEY_LEN], KeyError> {
    let key = ec_public_key(&format!("{field}.publicKey"), public_key_b64)?;
    check_signature(identity_key, field, &key, signature_b64)?;
    Ok(key)
}

/// Decodes `{field}.publicKey` (Kyber) and `{field}.signature`, and checks the signature was
/// made by `identity_key` over the serialised public key. Returns the decoded key.
pub fn check_signed_kyber_key(
    identity_key: &[u8; EC_KEY_LEN],
    field: &str,
    public_key_b64: &str,
    signature_b64: &str,
) -> Result<Vec<u8>, KeyError> {
    let key = kyber_public_key(&format!("{field}.publicKey"), public_key_b64)?;
    check_signature(identity_key, field, &key, signature_b64)?;
    Ok(key)
}

/// Decodes `{field}.signature` and verifies it over `message`.
fn check_signature(
    identity_key: &[u8; EC_KEY_LEN],
    field: &str,
    message: &[u8],
    signature_b64: &str,
) -> Result<(), KeyError> {
    let field = format!("{field}.signature");
    let sig = signature(&field, signature_b64)?;
    if verify_xeddsa(identity_key, message, &sig) {
        Ok(())
    } else {
        Err(KeyError::Signature { field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Made by libsignal (see `tests/data/README.md`).
    const VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/libsignal-keys.json"
    );

    fn vectors() -> Value {
        let json = std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("{VECTORS}: {e}"));
        serde_json::from_str(&json).expect("vector file is JSON")
    }

    fn text<'a>(v: &'a Value, key: &str) -> &'a str {
        v[key]
            .as_str()
            .unwrap_or_else(|| panic!("vector field {key}"))
    }

    /// First valid entry: (identity key, signed prekey b64, its signature b64, Kyber key b64,
    /// its signature b64).
    fn first_valid() -> ([u8; 33], String, String, String, String) {
        let v = &vectors()["valid"][0];
        let (spk, pq) = (&v["signedPreKey"], &v["pqLastResortPreKey"]);
        (
            ec_public_key("identityKey", text(v, "identityKey")).unwrap(),
            text(spk, "publicKey").to_owned(),
            text(spk, "signature").to_owned(),
            text(pq, "publicKey").to_owned(),
            text(pq, "signature").to_owned(),
        )
    }

    fn length(field: &str, expected: usize, actual: usize) -> KeyError {
        KeyError::Length {
            field: field.to_owned(),
            expected,
            actual,
        }
    }

    fn bad_sig(field: &str) -> KeyError {
        KeyError::Signature {
            field: field.to_owned(),
        }
    }

    #[test]
    fn every_valid_vector_decodes_and_verifies() {
        let vectors = vectors();
        let valid = vectors["valid"].as_array().expect("valid[]");
        assert!(!valid.is_empty());
        let mut one_time = 0;
        for (i, v) in valid.iter().enumerate() {
            let identity = ec_public_key("identityKey", text(v, "identityKey")).unwrap();
            let spk = &v["signedPreKey"];
            let key = check_signed_ec_key(
                &identity,
                "signedPreKey",
                text(spk, "publicKey"),
                text(spk, "signature"),
            )
            .unwrap_or_else(|e| panic!("valid[{i}]: {e}"));
            assert_eq!(key[0], EC_TYPE);

            let pq = &v["pqLastResortPreKey"];
            let kyber = check_signed_kyber_key(
                &identity,
                "pqLastResortPreKey",
                text(pq, "publicKey"),
                text(pq, "signature"),
            )
            .unwrap_or_else(|e| panic!("valid[{i}]: {e}"));
            assert_eq!((kyber.len(), kyber[0]), (KYBER_KEY_LEN, KYBER_TYPE));

            for (j, pk) in v["preKeys"]
                .as_array()
                .expect("preKeys[]")
                .iter()
                .enumerate()
            {
                ec_public_key(&format!("preKeys[{j}].publicKey"), text(pk, "publicKey"))
                    .unwrap_or_else(|e| panic!("valid[{i}]: {e}"));
                one_time += 1;
            }
        }
        assert!(one_time > 0);
    }

    #[test]
    fn every_invalid_vector_is_refused_for_its_reason() {
        let vectors = vectors();
        let invalid = vectors["invalid"].as_array().expect("invalid[]");
        assert!(!invalid.is_empty());
        for v in invalid {
            let why = text(v, "why");
            let identity = ec_public_key("identityKey", text(v, "identityKey")).unwrap();
            let spk = &v["signedPreKey"];
            let err = check_signed_ec_key(
                &identity,
                "signedPreKey",
                text(spk, "publicKey"),
                text(spk, "signature"),
            )
            .expect_err(why);
            // In these two cases the signature is good over the bytes as sent: only the
            // length and type-byte checks stand between them and acceptance.
            let structural = why.contains("32 bytes") || why.contains("type byte");
            let raw_key = STANDARD.decode(text(spk, "publicKey")).unwrap();
            let raw_sig = signature("s", text(spk, "signature"));
            let verifies_raw = raw_sig.is_ok_and(|sig| verify_xeddsa(&identity, &raw_key, &sig));
            assert_eq!(verifies_raw, structural, "{why}");

            let expected = if why.contains("32 bytes") {
                length("signedPreKey.publicKey", 33, 32)
            } else if why.contains("type byte") {
                KeyError::KeyType {
                    field: "signedPreKey.publicKey".into(),
                    expected: EC_TYPE,
                    actual: 0x06,
                }
            } else if why.contains("63 bytes") {
                length("signedPreKey.signature", 64, 63)
            } else {
                bad_sig("signedPreKey.signature")
            };
            assert_eq!(err, expected, "{why}");
        }
    }

    #[test]
    fn base64_must_be_standard_and_padded() {
        let (identity, spk, spk_sig, _, _) = first_valid();
        let b64 = |s: &str| decode_base64("f", s);
        let base64_err = Err(KeyError::Base64 { field: "f".into() });
        // Without padding, with too much, or with non-zero trailing bits.
        let unpadded = spk_sig.trim_end_matches('=');
        assert_ne!(unpadded, spk_sig);
        assert_eq!(b64(unpadded), base64_err);
        assert_eq!(b64(&format!("{spk_sig}=")), base64_err);
        assert_eq!(b64("AR=="), base64_err);
        assert_eq!(b64("AQ=="), Ok(vec![1]));
        assert_eq!(b64("AQ==AQ=="), base64_err);
        // URL-safe alphabet: find a valid key using '+' or '/' and translate it.
        let vectors = vectors();
        let with_specials = vectors["valid"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| text(&v["signedPreKey"], "publicKey"))
            .find(|k| k.contains(['+', '/']))
            .expect("some key uses + or /");
        let url_safe = with_specials.replace('+', "-").replace('/', "_");
        assert_eq!(b64(&url_safe), base64_err);
        // Whitespace anywhere.
        for s in [
            format!(" {spk}"),
            format!("{spk}\n"),
            format!("{}\r\n{}", &spk[..20], &spk[20..]),
        ] {
            assert_eq!(b64(&s), base64_err);
        }
        assert_eq!(
            check_signed_ec_key(&identity, "signedPreKey", &spk, unpadded),
            Err(KeyError::Base64 {
                field: "signedPreKey.signature".into()
            })
        );
        assert_eq!(
            ec_public_key("identityKey", "not base64!"),
            Err(KeyError::Base64 {
                field: "identityKey".into()
            })
        );
    }

    #[test]
    fn empty_and_oversized_inputs_are_length_errors() {
        assert_eq!(decode_base64("f", ""), Ok(vec![]));
        assert_eq!(ec_public_key("k", ""), Err(length("k", 33, 0)));
        assert_eq!(kyber_public_key("k", ""), Err(length("k", 1569, 0)));
        assert_eq!(signature("s", ""), Err(length("s", 64, 0)));

        let at_bound = "A".repeat(MAX_BASE64_LEN);
        assert_eq!(decode_base64("k", &at_bound).map(|b| b.len()), Ok(1572));
        assert_eq!(
            kyber_public_key("k", &at_bound),
            Err(length("k", 1569, 1572))
        );
        let over = "A".repeat(MAX_BASE64_LEN + 4);
        assert_eq!(
            kyber_public_key("k", &over),
            Err(length("k", MAX_BASE64_LEN, MAX_BASE64_LEN + 4))
        );
        let absurd = "A".repeat(16 << 20);
        assert_eq!(
            ec_public_key("k", &absurd),
            Err(length("k", MAX_BASE64_LEN, absurd.len()))
        );
        // Non-ASCII must not trip any slicing.
        assert!(ec_public_key("k", "ééééééééééééééééééééééé").is_err());
    }

    #[test]
    fn keys_are_checked_for_type_and_kind() {
        let (_, spk, _, kyber, _) = first_valid();
        let mut wrong = STANDARD.decode(&kyber).unwrap();
        wrong[0] = EC_TYPE;
        assert_eq!(
            kyber_public_key("pq", &STANDARD.encode(&wrong)),
            Err(KeyError::KeyType {
                field: "pq".into(),
                expected: KYBER_TYPE,
                actual: EC_TYPE
            })
        );
        assert_eq!(kyber_public_key("pq", &spk), Err(length("pq", 1569, 33)));
        assert_eq!(ec_public_key("k", &kyber), Err(length("k", 33, 1569)));
        assert_eq!(signature("s", &spk), Err(length("s", 64, 33)));
    }

    #[test]
    fn any_flipped_bit_in_a_signature_or_signed_key_is_refused() {
        let (identity, spk, spk_sig, kyber, kyber_sig) = first_valid();
        let key = ec_public_key("k", &spk).unwrap();
        let kyber = kyber_public_key("k", &kyber).unwrap();
        for (message, sig) in [(&key[..], &spk_sig), (&kyber[..], &kyber_sig)] {
            let sig = signature("s", sig).unwrap();
            assert!(verify_xeddsa(&identity, message, &sig));
            // One bit in every byte (a different one each time), and every bit of the two
            // bytes with special meaning: the top of R and the sign bit / top of s.
            let sig_bits = (0..SIGNATURE_LEN).map(|i| i * 8 + i % 8);
            let special = (31 * 8..32 * 8).chain(63 * 8..64 * 8);
            for bit in sig_bits.chain(special) {
                let mut flipped = sig;
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(!verify_xeddsa(&identity, message, &flipped), "bit {bit}");
            }
            // Debug-build verification is slow: sample about 40 bits of the signed key.
            for bit in (0..message.len() * 8).step_by(message.len() / 5 + 1) {
                let mut flipped = message.to_vec();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(!verify_xeddsa(&identity, &flipped, &sig), "bit {bit}");
            }
        }
        // Through the public checks: a flipped bit in the Kyber signature.
        let mut sig = STANDARD.decode(&kyber_sig).unwrap();
        sig[10] ^= 0x04;
        assert_eq!(
            check_signed_kyber_key(
                &identity,
                "pqLastResortPreKey",
                &STANDARD.encode(&kyber),
                &STANDARD.encode(&sig)
            ),
            Err(bad_sig("pqLastResortPreKey.signature"))
        );
        // A valid signature, but over the other key.
        assert_eq!(
            check_signed_ec_key(&identity, "signedPreKey", &spk, &kyber_sig),
            Err(bad_sig("signedPreKey.signature"))
        );
    }

    #[test]
    fn identity_key_must_be_right_type_and_right_key() {
        let (identity, spk, spk_sig, kyber, kyber_sig) = first_valid();
        let mut wrong_type = identity;
        wrong_type[0] = 0x06;
        assert_eq!(
            check_signed_ec_key(&wrong_type, "signedPreKey", &spk, &spk_sig),
            Err(bad_sig("signedPreKey.signature"))
        );
        assert_eq!(
            check_signed_kyber_key(&wrong_type, "pq", &kyber, &kyber_sig),
            Err(bad_sig("pq.signature"))
        );
        assert_eq!(
            ec_public_key("identityKey", &STANDARD.encode(wrong_type)),
            Err(KeyError::KeyType {
                field: "identityKey".into(),
                expected: EC_TYPE,
                actual: 0x06
            })
        );
        let vectors = vectors();
        let other = ec_public_key("i", text(&vectors["valid"][1], "identityKey")).unwrap();
        assert_ne!(other, identity);
        assert_eq!(
            check_signed_ec_key(&other, "signedPreKey", &spk, &spk_sig),
            Err(bad_sig("signedPreKey.signature"))
        );
    }

    #[test]
    fn hostile_points_and_scalars_never_panic() {
        let (identity, spk, spk_sig, _, _) = first_valid();
        let message = ec_public_key("k", &spk).unwrap();
        let good = signature("s", &spk_sig).unwrap();
        // Montgomery u = 0, 1, -1 (no Edwards point), p, 2^255 - 1, and a pseudo-random walk.
        let mut us: Vec<[u8; 32]> = vec![[0; 32], [0xFF; 32]];
        let mut u = [0u8; 32];
        u[0] = 1;
        us.push(u);
        let mut minus_one = [0xFF; 32];
        minus_one[0] = 0xEC;
        minus_one[31] = 0x7F;
        us.push(minus_one);
        minus_one[0] = 0xED;
        us.push(minus_one);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for _ in 0..32 {
            us.push(std::array::from_fn(|_| next()));
        }
        let mut sigs = vec![[0u8; 64], [0xFF; 64], good];
        for _ in 0..32 {
            sigs.push(std::array::from_fn(|_| next()));
        }
        let mut accepted = Vec::new();
        for u in &us {
            let mut key = [EC_TYPE; 33];
            key[1..].copy_from_slice(u);
            for sig in &sigs {
                if verify_xeddsa(&key, &message, sig) {
                    accepted.push((key[1], *sig == [0; 64]));
                }
            }
        }
        // libsignal parity, not an endorsement: XEdDSA does not refuse low-order keys. u = 1 is
        // the order-4 point (i, 0); with R = that point and s = 0 the all-zero signature
        // verifies whenever h = 3 (mod 4), as it does for this message. Only the owner of such
        // an identity key is hurt, and libsignal clients never produce one.
        assert_eq!(accepted, [(1, true)]);
        assert!(!verify_xeddsa(&identity, &message, &[0; 64]));
    }

    #[test]
    fn error_messages_name_the_field_but_never_the_bytes() {
        let (identity, spk, _, _, kyber_sig) = first_valid();
        let err = check_signed_ec_key(&identity, "signedPreKey", &spk, &kyber_sig).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("signedPreKey.signature"), "{msg}");
        assert!(
            !msg.contains(&spk[..8]) && !msg.contains(&kyber_sig[..8]),
            "{msg}"
        );
        let err = ec_public_key("identityKey", &format!("C{}", &spk[1..])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "identityKey has key type 0x09, expected 0x05"
        );
    }
}
