//! The sealed-sender certificate set: loading it (or making one on a first
//! start), `courier certificates generate`, and `GET /v1/certificate/delivery`.
//!
//! A set is four files of base64 text in one directory:
//! - `trust-root.pub`: the trust root's public key, what clients pin;
//! - `trust-root.key`: its private key, which belongs offline: the server
//!   never reads it, it only signs a new server certificate;
//! - `server.key`: the server key, which signs sender certificates;
//! - `server.crt`: the `ServerCertificate` for it, signed by the trust root.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::rngs::OsRng;

use crate::domain::address::Address;
use crate::domain::certificates::{
    check_signing, sender_certificate, server_certificate, KeyPair, Sender, Signing,
};
use crate::domain::keys::EC_KEY_LEN;
use crate::error::ApiError;
use crate::service::state::State;
use crate::store;
use crate::wire::DeliveryCertificate;

const TRUST_ROOT_PUBLIC: &str = "trust-root.pub";
const TRUST_ROOT_PRIVATE: &str = "trust-root.key";
const SERVER_KEY: &str = "server.key";
const SERVER_CERTIFICATE: &str = "server.crt";

/// The key id a generated server certificate carries unless told otherwise.
pub const DEFAULT_KEY_ID: u32 = 1;

/// What the server holds: the trust root's public key, and the server key
/// with its certificate.
#[derive(Debug, Clone)]
pub struct Certificates {
    trust_root: [u8; EC_KEY_LEN],
    signing: Signing,
    /// How long a sender certificate is valid.
    lifetime: Duration,
}

impl Certificates {
    pub fn trust_root(&self) -> &[u8; EC_KEY_LEN] {
        &self.trust_root
    }

    pub fn trust_root_base64(&self) -> String {
        STANDARD.encode(self.trust_root)
    }

    /// A sender certificate for `sender`'s device with `identity_key`,
    /// expiring `lifetime` from `now_ms`.
    pub fn issue(&self, sender: Address, identity_key: [u8; EC_KEY_LEN], now_ms: u64) -> Vec<u8> {
        let expires = now_ms.saturating_add(self.lifetime.as_millis() as u64);
        let sender = Sender {
            account: sender.account.0,
            device: sender.device.0,
            identity_key,
            expires,
        };
        sender_certificate(&sender, &self.signing, &mut OsRng)
    }
}

/// Makes a new set in `dir` (created if needed); refuses to overwrite one.
/// Returns the trust root's public key, base64.
pub fn generate(dir: &Path, key_id: u32) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for name in [
        TRUST_ROOT_PUBLIC,
        TRUST_ROOT_PRIVATE,
        SERVER_KEY,
        SERVER_CERTIFICATE,
    ] {
        if dir.join(name).exists() {
            return Err(format!(
                "{} already exists: a certificate set is never overwritten",
                dir.join(name).display()
            ));
        }
    }
    let root = KeyPair::generate(&mut OsRng);
    let server = KeyPair::generate(&mut OsRng);
    let certificate = server_certificate(key_id, server.public_key(), &root, &mut OsRng);
    write_secret(&dir.join(TRUST_ROOT_PRIVATE), root.private_bytes())?;
    write_secret(&dir.join(SERVER_KEY), server.private_bytes())?;
    write_public(&dir.join(SERVER_CERTIFICATE), &certificate)?;
    write_public(&dir.join(TRUST_ROOT_PUBLIC), root.public_key())?;
    Ok(STANDARD.encode(root.public_key()))
}

/// The set in `dir`. With `generate_if_missing` and no set there at all, a
/// new one is made first (and its trust root logged), so a first start
/// needs no setup. A set that is there but incomplete, unreadable, or whose
/// server key is not the one its certificate certifies is an error.
pub fn load(
    dir: &Path,
    lifetime: Duration,
    generate_if_missing: bool,
) -> Result<Certificates, String> {
    let present = [TRUST_ROOT_PUBLIC, SERVER_KEY, SERVER_CERTIFICATE]
        .iter()
        .any(|name| dir.join(name).exists());
    if !present {
        if !generate_if_missing {
            return Err(format!(
                "no sealed-sender certificates in {}: make one set with `courier certificates \
                 generate --out DIR` and give every node of the cluster that directory \
                 (COURIER_CERTIFICATES_DIR)",
                dir.display()
            ));
        }
        let root = generate(dir, DEFAULT_KEY_ID)?;
        log::warn!(
            "made a sealed-sender certificate set in {}; trust root public key {root}. Move {} \
             offline: the server never needs it",
            dir.display(),
            dir.join(TRUST_ROOT_PRIVATE).display()
        );
    }
    let trust_root: [u8; EC_KEY_LEN] = read(dir, TRUST_ROOT_PUBLIC)?
        .try_into()
        .map_err(|_| format!("{TRUST_ROOT_PUBLIC} is not a 33-byte public key"))?;
    let private: [u8; 32] = read(dir, SERVER_KEY)?
        .try_into()
        .map_err(|_| format!("{SERVER_KEY} is not a 32-byte private key"))?;
    let signing = Signing {
        key: KeyPair::from_private(private),
        certificate: read(dir, SERVER_CERTIFICATE)?,
    };
    let key_id = check_signing(&signing, &trust_root)
        .map_err(|e| format!("{}: {e}", dir.join(SERVER_CERTIFICATE).display()))?;
    log::info!("sealed sender: server certificate key id {key_id}");
    Ok(Certificates {
        trust_root,
        signing,
        lifetime,
    })
}

/// Where the set lives unless configured: `certificates/` beside the
/// default database, in `$STATE_DIRECTORY` under systemd.
pub fn default_dir() -> PathBuf {
    crate::config::state_dir().join("certificates")
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, String> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    STANDARD
        .decode(text.trim())
        .map_err(|_| format!("{} is not base64", path.display()))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, format!("{}\n", STANDARD.encode(bytes)))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A private key: created new, readable by its owner only.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    writeln!(file, "{}", STANDARD.encode(bytes))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `GET /v1/certificate/delivery`: a sender certificate for `device`, with
/// its account's identity key; `409` while it has none.
pub async fn delivery(state: &State, device: Address) -> Result<DeliveryCertificate, ApiError> {
    state
        .limits
        .check(
            crate::limits::Limit::SenderCertificatePerAccount,
            device.account,
        )
        .await?;
    let key = store::blocking(&state.pool, move |conn| {
        store::accounts::identity_key(conn, device.account).map_err(ApiError::from)
    })
    .await?;
    let key: [u8; EC_KEY_LEN] = key
        .and_then(|k| k.try_into().ok())
        .ok_or(ApiError::NoIdentityKey)?;
    let now = u64::try_from(store::now_ms()).unwrap_or_default();
    let certificate = state.certificates.issue(device, key, now);
    Ok(DeliveryCertificate {
        certificate: STANDARD.encode(certificate),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::address::{AccountId, DeviceId};
    use crate::domain::certificates::check_sender_certificate;

    #[test]
    fn a_generated_set_loads_and_issues_valid_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let root = generate(dir.path(), 9).unwrap();
        let certs = load(dir.path(), Duration::from_secs(3600), false).unwrap();
        assert_eq!(certs.trust_root_base64(), root);
        let sender = Address::new(AccountId::random(), DeviceId(2));
        let identity = *KeyPair::generate(&mut OsRng).public_key();
        let cert = certs.issue(sender, identity, 1_000);
        let checked = check_sender_certificate(&cert, certs.trust_root(), 1_000).unwrap();
        assert_eq!(checked.account, sender.account.0);
        assert_eq!(checked.device, 2);
        assert_eq!(checked.identity_key, identity);
        assert_eq!(checked.expires, 1_000 + 3_600_000);
        // Private keys are for their owner only.
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(SERVER_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn a_set_is_never_overwritten_and_a_broken_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), 1).unwrap();
        assert!(generate(dir.path(), 1).is_err());
        // A server key that is not the certified one.
        let other = tempfile::tempdir().unwrap();
        generate(other.path(), 1).unwrap();
        std::fs::copy(other.path().join(SERVER_KEY), dir.path().join(SERVER_KEY)).unwrap();
        let err = load(dir.path(), Duration::from_secs(60), true).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        // Nothing there, and not allowed to make one (a cluster node).
        let empty = tempfile::tempdir().unwrap();
        assert!(load(empty.path(), Duration::from_secs(60), false).is_err());
        assert!(load(empty.path(), Duration::from_secs(60), true).is_ok());
    }
}
