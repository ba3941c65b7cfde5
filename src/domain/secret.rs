//! Device secrets and provisioning codes: generation, salted hashing and
//! constant-time comparison.
//!
//! Device secrets are client-generated tokens of 16–256 printable ASCII bytes
//! (Signal clients send 18 random bytes, base64), not human passwords, so,
//! like Signal-Server's `SaltedTokenHash`, they are stored as SHA-256 over a
//! per-device random salt and the secret. A slow password KDF would add
//! nothing against guessing a random token and would cap the rate of
//! authenticated requests. Guessing is further bounded by the per-IP limit on
//! failed authentications.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MIN_SECRET_LEN: usize = 16;
pub const MAX_SECRET_LEN: usize = 256;
pub const SALT_LEN: usize = 16;

/// The SPEC's secret rule: 16–256 bytes of printable ASCII (0x20..=0x7e).
pub fn is_valid_secret(secret: &str) -> bool {
    (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&secret.len())
        && secret.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A fresh salt and the hash to store for `secret`.
pub fn hash_new_secret(secret: &str) -> (Vec<u8>, Vec<u8>) {
    let mut salt = vec![0u8; SALT_LEN];
    rand::thread_rng().fill_bytes(&mut salt);
    let hash = hash_secret(&salt, secret);
    (salt, hash)
}

pub fn hash_secret(salt: &[u8], secret: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().to_vec()
}

/// Constant-time check of `secret` against a stored salt and hash.
pub fn verify_secret(salt: &[u8], stored_hash: &[u8], secret: &str) -> bool {
    let hash = hash_secret(salt, secret);
    bool::from(hash.ct_eq(stored_hash))
}

/// A burned-in salt and hash used when the device does not exist, so an
/// unknown account costs the same work as a wrong secret.
pub fn verify_against_nothing(secret: &str) {
    let _ = verify_secret(&[0u8; SALT_LEN], &[0u8; 32], secret);
}

/// A single-use device-linking code: 128 random bits, URL-safe.
pub fn new_provisioning_code() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The stored form of a provisioning code. Codes are 128-bit random, so a
/// plain SHA-256 (no salt) is enough to make a database leak useless while
/// keeping lookup by code possible.
pub fn provisioning_code_hash(code: &str) -> String {
    let digest = Sha256::digest(code.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_rules() {
        assert!(is_valid_secret("0123456789abcdef"));
        assert!(is_valid_secret(&"x".repeat(256)));
        assert!(!is_valid_secret("short"));
        assert!(!is_valid_secret(&"x".repeat(257)));
        assert!(!is_valid_secret("0123456789abcde\u{7f}"));
        assert!(!is_valid_secret("0123456789abcdé"));
        assert!(!is_valid_secret("0123456789abcde\n"));
    }

    #[test]
    fn hashes_are_salted_and_verify() {
        let (s1, h1) = hash_new_secret("correct horse battery");
        let (s2, h2) = hash_new_secret("correct horse battery");
        assert_ne!(s1, s2);
        assert_ne!(h1, h2);
        assert!(verify_secret(&s1, &h1, "correct horse battery"));
        assert!(!verify_secret(&s1, &h1, "correct horse batterz"));
        assert!(!verify_secret(&s1, &h2, "correct horse battery"));
    }

    #[test]
    fn codes_are_random_and_hashed() {
        let a = new_provisioning_code();
        let b = new_provisioning_code();
        assert_ne!(a, b);
        assert_eq!(provisioning_code_hash(&a).len(), 64);
        assert_ne!(provisioning_code_hash(&a), a);
    }
}
