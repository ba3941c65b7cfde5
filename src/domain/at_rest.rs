//! Encryption at rest of stored envelopes (`COURIER_STORAGE_KEY`).
//!
//! A [`StorageKeys`] holds the current key and, during a rotation, the one
//! before it. Each sealed payload is XChaCha20-Poly1305 under one of them,
//! with a random 24-byte nonce, stored as `nonce || ciphertext`; the id of
//! the key ([`key_id`]) is stored beside it (the `key_id` column), so rows
//! written under the previous key still open after a rotation. The id is
//! derived from the key, never configured: a key always has the same id,
//! on every node of a cluster.
//!
//! The associated data binds a payload to its place: a mailbox row's
//! ([`mailbox_row_aad`]) names the recipient device, the guid and the
//! client-given fields left in the clear, so a row copied to another
//! mailbox, or under another guid, does not open. Every AAD starts with a
//! label naming what it binds, so a payload of one kind never opens as
//! another ([`shared_payload_aad`] is the shared part of a multi-recipient
//! message's).
//!
//! What a mailbox row seals is [`RowPlaintext`]: the sender (or none) and
//! the content, in a small versioned encoding.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::address::{AccountId, Address, DeviceId};

/// Bytes of a storage key.
pub const KEY_LEN: usize = 32;
/// Bytes of the random nonce that starts every sealed payload.
pub const NONCE_LEN: usize = 24;
/// Bytes a sealed payload adds to its plaintext: the nonce and the tag.
pub const OVERHEAD: usize = NONCE_LEN + 16;

/// One storage key and its id.
struct StorageKey {
    id: i32,
    cipher: XChaCha20Poly1305,
}

impl StorageKey {
    fn new(key: &[u8; KEY_LEN]) -> StorageKey {
        StorageKey {
            id: key_id(key),
            cipher: XChaCha20Poly1305::new(key.into()),
        }
    }
}

/// Why the configured keys were refused. Never carries a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is not base64")]
    NotBase64,
    #[error("is {0} bytes; it must be 32 bytes (base64)")]
    WrongLength(usize),
    #[error("has the same key id as the current key (the same key twice?)")]
    SameId,
}

/// Which configured key a [`KeyError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhichKey {
    Current,
    Previous,
}

/// The current storage key, which seals, and optionally the previous one,
/// which only opens. Its `Debug` shows the key ids, never the keys.
pub struct StorageKeys {
    current: StorageKey,
    previous: Option<StorageKey>,
}

impl std::fmt::Debug for StorageKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageKeys")
            .field("current", &self.current.id)
            .field("previous", &self.previous.as_ref().map(|k| k.id))
            .finish()
    }
}

/// The id stored beside a payload sealed under `key`: the first 4 bytes of
/// SHA-256("courier storage key id" || key), as a non-negative `i32`.
pub fn key_id(key: &[u8; KEY_LEN]) -> i32 {
    let digest = Sha256::new()
        .chain_update(b"courier storage key id")
        .chain_update(key)
        .finalize();
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & 0x7fff_ffff;
    n as i32
}

/// A configured key: base64 (standard alphabet, padded) of exactly 32 bytes.
pub fn decode_key(b64: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = STANDARD
        .decode(b64.trim())
        .map_err(|_| KeyError::NotBase64)?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyError::WrongLength(bytes.len()))
}

impl StorageKeys {
    pub fn new(
        current: &[u8; KEY_LEN],
        previous: Option<&[u8; KEY_LEN]>,
    ) -> Result<Self, KeyError> {
        let current = StorageKey::new(current);
        let previous = previous.map(StorageKey::new);
        if previous.as_ref().is_some_and(|p| p.id == current.id) {
            return Err(KeyError::SameId);
        }
        Ok(StorageKeys { current, previous })
    }

    /// The keys as configured (base64). The error says which key is wrong,
    /// and how, without its value.
    pub fn from_base64(
        current: &str,
        previous: Option<&str>,
    ) -> Result<Self, (WhichKey, KeyError)> {
        let current = decode_key(current).map_err(|e| (WhichKey::Current, e))?;
        let previous = previous
            .map(decode_key)
            .transpose()
            .map_err(|e| (WhichKey::Previous, e))?;
        StorageKeys::new(&current, previous.as_ref()).map_err(|e| (WhichKey::Previous, e))
    }

    /// The id new payloads are sealed under.
    pub fn current_id(&self) -> i32 {
        self.current.id
    }

    /// The id of the previous key, if one is configured.
    pub fn previous_id(&self) -> Option<i32> {
        self.previous.as_ref().map(|k| k.id)
    }

    /// Whether a configured key has the id `key_id`.
    pub fn knows(&self, key_id: i32) -> bool {
        self.current.id == key_id || self.previous_id() == Some(key_id)
    }

    /// Seals `plaintext` bound to `aad` under the current key: its id, and
    /// `nonce || ciphertext` (the plaintext's length plus [`OVERHEAD`]).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> (i32, Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .current
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // Only fails past the cipher's length limit (~256 GiB).
            .expect("XChaCha20-Poly1305 seals any payload courier stores");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        (self.current.id, out)
    }

    /// Opens what [`seal`](Self::seal) made under the key `key_id` with the
    /// same `aad`. `None` when no configured key has that id, or the payload
    /// does not authenticate (another place, another key, altered).
    pub fn open(&self, key_id: i32, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let key = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|k| k.id == key_id)?;
        if sealed.len() < OVERHEAD {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        key.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .ok()
    }
}

/// Appends a length-prefixed field, so that no two different lists of
/// fields encode the same.
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The associated data of a mailbox row: the recipient device, the guid,
/// and the fields that stay in the clear and reach the client as they are
/// (`type`, the sender's `timestamp`). Not `server_timestamp`: retention
/// reads it, and an operator may move it.
pub fn mailbox_row_aad(dest: Address, guid: Uuid, msg_type: i32, timestamp: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    field(&mut out, b"courier mailbox row v1");
    field(&mut out, dest.account.0.as_bytes());
    field(&mut out, &dest.device.0.to_be_bytes());
    field(&mut out, guid.as_bytes());
    field(&mut out, &msg_type.to_be_bytes());
    field(&mut out, &timestamp.to_be_bytes());
    out
}

/// The associated data of the shared part of a multi-recipient message
/// (`mailbox_shared`), stored under `id`.
pub fn shared_payload_aad(id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    field(&mut out, b"courier shared payload v1");
    field(&mut out, id.as_bytes());
    out
}

/// What a mailbox row seals: the sender and the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlaintext {
    pub source: Option<Address>,
    pub content: Vec<u8>,
}

/// Version byte of [`RowPlaintext::encode`].
const ROW_V1: u8 = 1;

impl RowPlaintext {
    /// `1`, then `0` (no sender) or `1` + the account's 16 bytes + the
    /// device id (4 bytes, big-endian), then the content.
    pub fn encode(source: Option<Address>, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(22 + content.len());
        out.push(ROW_V1);
        match source {
            None => out.push(0),
            Some(a) => {
                out.push(1);
                out.extend_from_slice(a.account.0.as_bytes());
                out.extend_from_slice(&a.device.0.to_be_bytes());
            }
        }
        out.extend_from_slice(content);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<RowPlaintext> {
        let (&version, rest) = bytes.split_first()?;
        if version != ROW_V1 {
            return None;
        }
        let (&has_source, rest) = rest.split_first()?;
        let (source, content) = match has_source {
            0 => (None, rest),
            1 if rest.len() >= 20 => {
                let (account, rest) = rest.split_at(16);
                let (device, content) = rest.split_at(4);
                let account = AccountId(Uuid::from_slice(account).ok()?);
                let device = DeviceId(u32::from_be_bytes(device.try_into().ok()?));
                (Some(Address::new(account, device)), content)
            }
            _ => return None,
        };
        Some(RowPlaintext {
            source,
            content: content.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(current: u8, previous: Option<u8>) -> StorageKeys {
        StorageKeys::new(&[current; 32], previous.map(|p| [p; 32]).as_ref()).unwrap()
    }

    fn place() -> (Address, Uuid) {
        (
            Address::new(AccountId(Uuid::new_v4()), DeviceId(2)),
            Uuid::now_v7(),
        )
    }

    #[test]
    fn round_trip_and_fresh_nonces() {
        let k = keys(1, None);
        let (dest, guid) = place();
        let aad = mailbox_row_aad(dest, guid, 1, 42);
        let (id, a) = k.seal(&aad, b"hello");
        let (_, b) = k.seal(&aad, b"hello");
        assert_eq!(id, k.current_id());
        assert_eq!(a.len(), 5 + OVERHEAD);
        assert_ne!(a, b, "a fresh nonce each time");
        assert_eq!(k.open(id, &aad, &a).as_deref(), Some(&b"hello"[..]));
        assert_eq!(k.open(id, &aad, &b).as_deref(), Some(&b"hello"[..]));
        let (_, empty) = k.seal(&aad, b"");
        assert_eq!(k.open(id, &aad, &empty), Some(Vec::new()));
    }

    #[test]
    fn another_place_does_not_open() {
        let k = keys(1, None);
        let (dest, guid) = place();
        let aad = mailbox_row_aad(dest, guid, 1, 42);
        let (id, sealed) = k.seal(&aad, b"hello");
        let other_device = Address::new(dest.account, DeviceId(3));
        let other_account = Address::new(AccountId(Uuid::new_v4()), dest.device);
        for wrong in [
            mailbox_row_aad(other_device, guid, 1, 42),
            mailbox_row_aad(other_account, guid, 1, 42),
            mailbox_row_aad(dest, Uuid::now_v7(), 1, 42),
            mailbox_row_aad(dest, guid, 3, 42),
            mailbox_row_aad(dest, guid, 1, 43),
            shared_payload_aad(&guid.to_string()),
            Vec::new(),
        ] {
            assert_eq!(k.open(id, &wrong, &sealed), None);
        }
    }

    #[test]
    fn another_key_or_altered_bytes_do_not_open() {
        let k = keys(1, None);
        let aad = shared_payload_aad("x");
        let (id, sealed) = k.seal(&aad, b"payload");
        // Another key that claims the same id.
        let other = keys(2, None);
        assert_eq!(other.open(id, &aad, &sealed), None);
        assert_eq!(other.open(other.current_id(), &aad, &sealed), None);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(k.open(id, &aad, &bad), None, "byte {i} flipped");
        }
        assert_eq!(k.open(id, &aad, &sealed[..sealed.len() - 1]), None);
        assert_eq!(k.open(id, &aad, &sealed[..OVERHEAD - 1]), None);
        assert_eq!(k.open(id, &aad, &[]), None);
    }

    #[test]
    fn the_previous_key_opens_and_unknown_ids_are_refused() {
        let old = keys(1, None);
        let aad = shared_payload_aad("x");
        let (old_id, sealed) = old.seal(&aad, b"before");
        let rotated = keys(2, Some(1));
        assert_eq!(rotated.previous_id(), Some(old_id));
        assert_ne!(rotated.current_id(), old_id);
        assert_eq!(
            rotated.open(old_id, &aad, &sealed).as_deref(),
            Some(&b"before"[..])
        );
        // New payloads go under the new key, which the old one cannot open.
        let (new_id, fresh) = rotated.seal(&aad, b"after");
        assert_eq!(new_id, rotated.current_id());
        assert_eq!(old.open(new_id, &aad, &fresh), None);
        // Once the previous key is dropped, its rows are gone.
        let dropped = keys(2, None);
        assert_eq!(dropped.open(old_id, &aad, &sealed), None);
        assert_eq!(dropped.open(12345, &aad, &fresh), None);
    }

    #[test]
    fn key_ids_are_stable_and_non_negative() {
        assert_eq!(key_id(&[7; 32]), key_id(&[7; 32]));
        assert_ne!(key_id(&[7; 32]), key_id(&[8; 32]));
        for b in 0..=255u8 {
            assert!(key_id(&[b; 32]) >= 0);
        }
    }

    #[test]
    fn configured_keys_are_checked_without_echoing_them() {
        let good = STANDARD.encode([5u8; 32]);
        let other = STANDARD.encode([6u8; 32]);
        let k = StorageKeys::from_base64(&good, Some(&other)).unwrap();
        assert_eq!(k.current_id(), key_id(&[5; 32]));
        assert_eq!(k.previous_id(), Some(key_id(&[6; 32])));
        assert_eq!(
            StorageKeys::from_base64("not base64!", None).unwrap_err(),
            (WhichKey::Current, KeyError::NotBase64)
        );
        assert_eq!(
            StorageKeys::from_base64(&STANDARD.encode([5u8; 16]), None).unwrap_err(),
            (WhichKey::Current, KeyError::WrongLength(16))
        );
        assert_eq!(
            StorageKeys::from_base64(&good, Some(&STANDARD.encode([1u8; 33]))).unwrap_err(),
            (WhichKey::Previous, KeyError::WrongLength(33))
        );
        assert_eq!(
            StorageKeys::from_base64(&good, Some(&good)).unwrap_err(),
            (WhichKey::Previous, KeyError::SameId)
        );
        let shown = format!("{k:?}");
        assert!(!shown.contains(&good) && !shown.contains("5, 5"), "{shown}");
    }

    #[test]
    fn row_plaintext_round_trips() {
        let sender = Address::new(AccountId(Uuid::new_v4()), DeviceId(u32::MAX));
        for source in [None, Some(sender)] {
            for content in [&b""[..], b"x", &[0u8; 300]] {
                let bytes = RowPlaintext::encode(source, content);
                assert_eq!(
                    RowPlaintext::decode(&bytes),
                    Some(RowPlaintext {
                        source,
                        content: content.to_vec()
                    })
                );
            }
        }
        assert_eq!(RowPlaintext::decode(&[]), None);
        assert_eq!(RowPlaintext::decode(&[2, 0]), None, "unknown version");
        assert_eq!(RowPlaintext::decode(&[1]), None);
        assert_eq!(RowPlaintext::decode(&[1, 2]), None);
        assert_eq!(RowPlaintext::decode(&[1, 1, 0, 0]), None, "short sender");
    }
}
