//! Sealed-sender certificates exactly as libsignal reads them: a
//! `ServerCertificate` (key id and server key, signed by the trust root) and
//! a `SenderCertificate` (account uuid, device, identity key and expiry,
//! signed by the server key, with the full server certificate embedded).
//!
//! The messages are libsignal's `sealed_sender.proto` (proto2), declared
//! here with prost's derives and the same field numbers; signatures are
//! XEdDSA over the encoded inner `Certificate`, as libsignal's
//! `calculate_signature` makes them. Pure: no I/O, no logging.

use prost::Message as _;
use rand::{CryptoRng, RngCore};
use uuid::Uuid;
use xeddsa::xed25519;
use xeddsa::Sign as _;

use super::keys::{verify_xeddsa, EC_KEY_LEN, EC_TYPE, SIGNATURE_LEN};

/// libsignal's `ServerCertificate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerCertificatePb {
    /// An encoded [`ServerCertificateBody`].
    #[prost(bytes = "vec", optional, tag = "1")]
    pub certificate: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub signature: Option<Vec<u8>>,
}

/// libsignal's `ServerCertificate.Certificate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerCertificateBody {
    #[prost(uint32, optional, tag = "1")]
    pub id: Option<u32>,
    /// The server's public key, 33 bytes.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
}

/// libsignal's `SenderCertificate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SenderCertificatePb {
    /// An encoded [`SenderCertificateBody`].
    #[prost(bytes = "vec", optional, tag = "1")]
    pub certificate: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub signature: Option<Vec<u8>>,
}

/// libsignal's `SenderCertificate.Certificate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SenderCertificateBody {
    /// Never set by courier: it stores no phone numbers.
    #[prost(string, optional, tag = "1")]
    pub sender_e164: Option<String>,
    #[prost(oneof = "SenderUuid", tags = "6, 7")]
    pub sender_uuid: Option<SenderUuid>,
    #[prost(uint32, optional, tag = "2")]
    pub sender_device: Option<u32>,
    /// Milliseconds since the epoch.
    #[prost(fixed64, optional, tag = "3")]
    pub expires: Option<u64>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub identity_key: Option<Vec<u8>>,
    #[prost(oneof = "Signer", tags = "5, 8")]
    pub signer: Option<Signer>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum SenderUuid {
    #[prost(string, tag = "6")]
    UuidString(String),
    #[prost(bytes, tag = "7")]
    UuidBytes(Vec<u8>),
}

/// Who signed: libsignal resolves a bare `Id` only for Signal's own
/// servers, so courier always embeds its whole server certificate.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Signer {
    /// An encoded [`ServerCertificatePb`].
    #[prost(bytes, tag = "5")]
    Certificate(Vec<u8>),
    #[prost(uint32, tag = "8")]
    Id(u32),
}

/// A Curve25519 key pair in libsignal's encodings: the 32-byte private
/// scalar and the 33-byte public key (`0x05` + Montgomery u).
#[derive(Clone)]
pub struct KeyPair {
    private: [u8; 32],
    public: [u8; EC_KEY_LEN],
}

impl std::fmt::Debug for KeyPair {
    /// The private half never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").finish_non_exhaustive()
    }
}

impl KeyPair {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> KeyPair {
        let mut private = [0u8; 32];
        rng.fill_bytes(&mut private);
        KeyPair::from_private(private)
    }

    /// The pair of a stored private key (X25519 clamps it when it is used).
    pub fn from_private(private: [u8; 32]) -> KeyPair {
        let secret = x25519_dalek::StaticSecret::from(private);
        let u = x25519_dalek::PublicKey::from(&secret);
        let mut public = [0u8; EC_KEY_LEN];
        public[0] = EC_TYPE;
        public[1..].copy_from_slice(u.as_bytes());
        KeyPair {
            private: secret.to_bytes(),
            public,
        }
    }

    pub fn private_bytes(&self) -> &[u8; 32] {
        &self.private
    }

    pub fn public_key(&self) -> &[u8; EC_KEY_LEN] {
        &self.public
    }

    /// An XEdDSA signature of `message`, verifiable against [`public_key`](Self::public_key).
    pub fn sign<R: RngCore + CryptoRng>(&self, message: &[u8], rng: &mut R) -> [u8; SIGNATURE_LEN] {
        xed25519::PrivateKey::from(&self.private).sign(message, rng)
    }
}

/// Why a certificate was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("not a certificate in libsignal's encoding")]
    Encoding,
    #[error("the server certificate is not signed by the trust root")]
    ServerSignature,
    #[error("the sender certificate is not signed by the server key")]
    SenderSignature,
    #[error("the certificate has expired")]
    Expired,
    #[error("the server key does not match the server certificate")]
    KeyMismatch,
}

/// A server certificate for `server_key`, signed by `trust_root`: the
/// encoded `ServerCertificate` message.
pub fn server_certificate<R: RngCore + CryptoRng>(
    key_id: u32,
    server_key: &[u8; EC_KEY_LEN],
    trust_root: &KeyPair,
    rng: &mut R,
) -> Vec<u8> {
    let body = ServerCertificateBody {
        id: Some(key_id),
        key: Some(server_key.to_vec()),
    }
    .encode_to_vec();
    let signature = trust_root.sign(&body, rng);
    ServerCertificatePb {
        certificate: Some(body),
        signature: Some(signature.to_vec()),
    }
    .encode_to_vec()
}

/// The key id and server key of an encoded server certificate, after its
/// signature was checked against `trust_root`.
pub fn check_server_certificate(
    encoded: &[u8],
    trust_root: &[u8; EC_KEY_LEN],
) -> Result<(u32, [u8; EC_KEY_LEN]), CertificateError> {
    let (body, signature) = signed_parts(
        ServerCertificatePb::decode(encoded).map(|pb| (pb.certificate, pb.signature)),
    )?;
    if !verify_xeddsa(trust_root, &body, &signature) {
        return Err(CertificateError::ServerSignature);
    }
    let body =
        ServerCertificateBody::decode(body.as_slice()).map_err(|_| CertificateError::Encoding)?;
    let id = body.id.ok_or(CertificateError::Encoding)?;
    let key = ec_key(body.key)?;
    Ok((id, key))
}

/// What a sender certificate says about its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub account: Uuid,
    pub device: u32,
    pub identity_key: [u8; EC_KEY_LEN],
    /// Milliseconds since the epoch.
    pub expires: u64,
}

/// The server key and its certificate: what signs sender certificates.
#[derive(Debug, Clone)]
pub struct Signing {
    pub key: KeyPair,
    /// The encoded `ServerCertificate` for `key`.
    pub certificate: Vec<u8>,
}

/// A sender certificate for `sender`, signed by `signing.key`, with the
/// whole server certificate embedded: the encoded `SenderCertificate`.
pub fn sender_certificate<R: RngCore + CryptoRng>(
    sender: &Sender,
    signing: &Signing,
    rng: &mut R,
) -> Vec<u8> {
    let body = SenderCertificateBody {
        sender_e164: None,
        sender_uuid: Some(SenderUuid::UuidString(
            sender.account.hyphenated().to_string(),
        )),
        sender_device: Some(sender.device),
        expires: Some(sender.expires),
        identity_key: Some(sender.identity_key.to_vec()),
        signer: Some(Signer::Certificate(signing.certificate.clone())),
    }
    .encode_to_vec();
    let signature = signing.key.sign(&body, rng);
    SenderCertificatePb {
        certificate: Some(body),
        signature: Some(signature.to_vec()),
    }
    .encode_to_vec()
}

/// Validates an encoded sender certificate as libsignal's
/// `SenderCertificate::validate` does: the embedded server certificate is
/// signed by `trust_root`, the sender certificate by that server key, and
/// it has not expired at `now_ms`.
pub fn check_sender_certificate(
    encoded: &[u8],
    trust_root: &[u8; EC_KEY_LEN],
    now_ms: u64,
) -> Result<Sender, CertificateError> {
    let (body, signature) = signed_parts(
        SenderCertificatePb::decode(encoded).map(|pb| (pb.certificate, pb.signature)),
    )?;
    let parsed =
        SenderCertificateBody::decode(body.as_slice()).map_err(|_| CertificateError::Encoding)?;
    let Some(Signer::Certificate(server)) = parsed.signer else {
        return Err(CertificateError::Encoding);
    };
    let (_, server_key) = check_server_certificate(&server, trust_root)?;
    if !verify_xeddsa(&server_key, &body, &signature) {
        return Err(CertificateError::SenderSignature);
    }
    let account = match parsed.sender_uuid {
        Some(SenderUuid::UuidString(s)) => Uuid::parse_str(&s).ok(),
        Some(SenderUuid::UuidBytes(b)) => Uuid::from_slice(&b).ok(),
        None => None,
    }
    .ok_or(CertificateError::Encoding)?;
    let sender = Sender {
        account,
        device: parsed.sender_device.ok_or(CertificateError::Encoding)?,
        identity_key: ec_key(parsed.identity_key)?,
        expires: parsed.expires.ok_or(CertificateError::Encoding)?,
    };
    if now_ms > sender.expires {
        return Err(CertificateError::Expired);
    }
    Ok(sender)
}

/// Checks that `key` is the key `certificate` certifies (under `trust_root`).
pub fn check_signing(
    signing: &Signing,
    trust_root: &[u8; EC_KEY_LEN],
) -> Result<u32, CertificateError> {
    let (id, key) = check_server_certificate(&signing.certificate, trust_root)?;
    if &key != signing.key.public_key() {
        return Err(CertificateError::KeyMismatch);
    }
    Ok(id)
}

type Parts = Result<(Option<Vec<u8>>, Option<Vec<u8>>), prost::DecodeError>;

fn signed_parts(parts: Parts) -> Result<(Vec<u8>, [u8; SIGNATURE_LEN]), CertificateError> {
    let (Some(body), Some(signature)) = parts.map_err(|_| CertificateError::Encoding)? else {
        return Err(CertificateError::Encoding);
    };
    let signature = signature
        .try_into()
        .map_err(|_| CertificateError::Encoding)?;
    Ok((body, signature))
}

fn ec_key(key: Option<Vec<u8>>) -> Result<[u8; EC_KEY_LEN], CertificateError> {
    let key: [u8; EC_KEY_LEN] = key
        .and_then(|k| k.try_into().ok())
        .ok_or(CertificateError::Encoding)?;
    if key[0] != EC_TYPE {
        return Err(CertificateError::Encoding);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use rand::rngs::OsRng;

    use super::*;

    fn chain() -> (KeyPair, Signing) {
        let root = KeyPair::generate(&mut OsRng);
        let key = KeyPair::generate(&mut OsRng);
        let certificate = server_certificate(7, key.public_key(), &root, &mut OsRng);
        (root, Signing { key, certificate })
    }

    fn sender(identity_key: [u8; EC_KEY_LEN]) -> Sender {
        Sender {
            account: Uuid::new_v4(),
            device: 3,
            identity_key,
            expires: 2_000,
        }
    }

    #[test]
    fn signatures_verify_as_libsignal_verifies_them() {
        let pair = KeyPair::generate(&mut OsRng);
        let signature = pair.sign(b"message", &mut OsRng);
        assert!(verify_xeddsa(pair.public_key(), b"message", &signature));
        assert!(!verify_xeddsa(pair.public_key(), b"massage", &signature));
        let other = KeyPair::generate(&mut OsRng);
        assert!(!verify_xeddsa(other.public_key(), b"message", &signature));
        // A stored private key gives back the same public key.
        assert_eq!(
            KeyPair::from_private(*pair.private_bytes()).public_key(),
            pair.public_key()
        );
    }

    #[test]
    fn a_sender_certificate_validates_against_its_trust_root() {
        let (root, signing) = chain();
        assert_eq!(check_signing(&signing, root.public_key()), Ok(7));
        let identity = *KeyPair::generate(&mut OsRng).public_key();
        let who = sender(identity);
        let cert = sender_certificate(&who, &signing, &mut OsRng);
        assert_eq!(
            check_sender_certificate(&cert, root.public_key(), 1_000),
            Ok(who.clone())
        );
        assert_eq!(
            check_sender_certificate(&cert, root.public_key(), 2_001),
            Err(CertificateError::Expired)
        );
        let stranger = KeyPair::generate(&mut OsRng);
        assert_eq!(
            check_sender_certificate(&cert, stranger.public_key(), 1_000),
            Err(CertificateError::ServerSignature)
        );
    }

    #[test]
    fn tampering_is_refused() {
        let (root, signing) = chain();
        let who = sender(*KeyPair::generate(&mut OsRng).public_key());
        let cert = sender_certificate(&who, &signing, &mut OsRng);
        // Any flipped bit either breaks the encoding or a signature.
        for i in 0..cert.len() {
            let mut bad = cert.clone();
            bad[i] ^= 0x01;
            assert!(
                check_sender_certificate(&bad, root.public_key(), 1_000).is_err(),
                "byte {i}"
            );
        }
        // A server key other than the certified one.
        let wrong = Signing {
            key: KeyPair::generate(&mut OsRng),
            certificate: signing.certificate.clone(),
        };
        assert_eq!(
            check_signing(&wrong, root.public_key()),
            Err(CertificateError::KeyMismatch)
        );
        let forged = sender_certificate(&who, &wrong, &mut OsRng);
        assert_eq!(
            check_sender_certificate(&forged, root.public_key(), 1_000),
            Err(CertificateError::SenderSignature)
        );
    }

    #[test]
    fn the_encoding_uses_libsignals_field_numbers() {
        let server_key = [EC_TYPE; EC_KEY_LEN];
        let body = ServerCertificateBody {
            id: Some(7),
            key: Some(server_key.to_vec()),
        }
        .encode_to_vec();
        // id: field 1 varint; key: field 2 bytes.
        assert_eq!(body[..4], [0x08, 7, 0x12, 33]);

        let (_, signing) = chain();
        let who = sender([EC_TYPE; EC_KEY_LEN]);
        let cert =
            SenderCertificatePb::decode(sender_certificate(&who, &signing, &mut OsRng).as_slice())
                .unwrap();
        let body = cert.certificate.unwrap();
        let has = |part: &[u8]| body.windows(part.len()).any(|w| w == part);
        // uuidString: field 6, length-delimited, the hyphenated uuid.
        let uuid = [
            &[0x32, 36][..],
            who.account.hyphenated().to_string().as_bytes(),
        ]
        .concat();
        assert!(has(&uuid));
        // senderDevice: field 2 varint; expires: field 3 fixed64 (little endian).
        assert!(has(&[0x10, 3]));
        assert!(has(&[&[0x19][..], &2_000u64.to_le_bytes()].concat()));
        // identityKey: field 4; the embedded server certificate: field 5.
        assert!(has(&[&[0x22, 33][..], &[EC_TYPE; EC_KEY_LEN]].concat()));
        let len = u8::try_from(signing.certificate.len()).unwrap();
        assert!(has(&[&[0x2a, len][..], &signing.certificate].concat()));
    }
}
