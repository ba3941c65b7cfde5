//! Configuration: serde defaults, overlaid by an optional TOML file, overlaid
//! by `COURIER_*` environment variables. `courier serve` with neither works.
//!
//! Fields carry their unit in the name (`ack_timeout_ms`), as the environment
//! variables do; the accessors turn them into `Duration`s once. The file and
//! the environment (`env.rs`) are merged as TOML tables and `Config` is
//! deserialized once from the result, then checked against the ranges of
//! `bounds.rs`. Rates and the `[limits]` table are in `rate.rs`.

mod bounds;
mod env;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::at_rest::{StorageKeys, WhichKey};

pub use crate::limits::{Limits, Rate};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("environment variable {name}: {reason}")]
    Env { name: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything an operator can set. Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listen address (`COURIER_BIND`).
    pub bind: String,
    /// `postgres://…` selects PostgreSQL; anything else is a SQLite file path
    /// (an optional `sqlite://` prefix is stripped).
    pub database_url: String,
    /// When set, `POST /v1/accounts` requires this token.
    pub registration_token: Option<String>,
    /// How long a live copy may wait for its ack before it is spilled.
    pub ack_timeout_ms: u64,
    /// Mailbox messages older than this are deleted by the sweeper.
    pub message_retention_days: u64,
    /// Unanswered sends per WebSocket before the server stops reading its frames.
    pub max_inflight_sends: usize,
    /// Mailbox cap per device; a send that would exceed it is answered `507`.
    pub mailbox_max_messages: u64,
    /// One-time keys (EC and PQ each) stored per device at most.
    pub max_one_time_keys: u64,
    /// Devices an account may have, the primary included.
    pub max_devices: u32,
    /// Lifetime of a device-linking code.
    pub provisioning_code_ttl_secs: u64,
    /// Lifetime of a rendezvous channel.
    pub rendezvous_ttl_secs: u64,
    /// Upper bound on a graceful drain after SIGTERM.
    pub drain_timeout_ms: u64,
    /// How often the retention sweeper runs.
    pub sweep_interval_secs: u64,
    /// How long a cached device set may be used by the send path, and a
    /// cached device secret by authentication (only changes made by other
    /// processes on a shared database wait for it).
    pub device_cache_ttl_ms: u64,
    /// Database connections in the pool.
    pub db_pool_size: u32,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// `false` turns every rate limit off (`COURIER_RATE_LIMITS=off`), for
    /// benchmarks on loopback.
    pub rate_limits: bool,
    /// Proxies whose `X-Forwarded-For` is believed for the client IP.
    pub trusted_proxies: Vec<IpAddr>,
    /// `redis://HOST:PORT/DB`: makes this node a member of a cluster whose
    /// members share one PostgreSQL `database_url` and this Redis (presence,
    /// cross-node delivery, shared rate limits; nothing durable).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel of the cluster, so several
    /// clusters (or test runs) can share one Redis. Every member must use
    /// the same one.
    pub cluster_name: String,
    /// At most one push per device per this many seconds while it stays away.
    pub push_coalesce_secs: u64,
    /// The VAPID `sub` claim: how a push service reaches the operator
    /// (`mailto:` or `https:` URI).
    pub push_subject: String,
    /// Tests only: accept `http://` push endpoints and endpoints on
    /// loopback, private or other special addresses.
    pub push_allow_insecure: bool,
    /// The sealed-sender certificate set (`courier certificates generate`);
    /// unset: `certificates/` in the state directory, made on the first start
    /// of a node that runs alone.
    pub certificates_dir: Option<PathBuf>,
    /// How long a sender certificate (`GET /v1/certificate/delivery`) is valid.
    pub sender_certificate_hours: u64,
    /// Base64 of 32 bytes: stored envelopes' sender and content are
    /// encrypted at rest under this key (unset: stored in the clear).
    pub storage_key: Option<String>,
    /// The storage key before the current one, during a rotation: rows
    /// written under it still read back. Needs `storage_key`.
    pub storage_key_previous: Option<String>,
    /// Per-key GCRA limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "127.0.0.1:8080".into(),
            database_url: default_database_url(),
            registration_token: None,
            ack_timeout_ms: 2_000,
            message_retention_days: 30,
            max_inflight_sends: 1_000,
            mailbox_max_messages: 100_000,
            max_one_time_keys: 1_000,
            max_devices: 16,
            provisioning_code_ttl_secs: 600,
            rendezvous_ttl_secs: 600,
            drain_timeout_ms: 10_000,
            sweep_interval_secs: 600,
            device_cache_ttl_ms: 5_000,
            db_pool_size: 16,
            workers: 0,
            rate_limits: true,
            trusted_proxies: Vec::new(),
            redis_url: None,
            cluster_name: "courier".into(),
            push_coalesce_secs: 30,
            push_subject: "mailto:admin@localhost".into(),
            push_allow_insecure: false,
            certificates_dir: None,
            sender_certificate_hours: 24,
            storage_key: None,
            storage_key_previous: None,
            limits: Limits::default(),
        }
    }
}

/// `courier.db` in the state directory.
fn default_database_url() -> String {
    state_dir()
        .join("courier.db")
        .to_string_lossy()
        .into_owned()
}

/// Where courier keeps what it makes for itself: `$STATE_DIRECTORY` under
/// systemd, else the working directory.
pub fn state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            // systemd passes a colon-separated list when several are configured.
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("."))
}

impl Config {
    /// Defaults ← the TOML file (if any) ← `COURIER_*` variables of `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        let overlay = env::overlay(&mut table, env)?;
        let config = Config::deserialize(table).map_err(|e| overlay.blame(e))?;
        config.validate()?;
        Ok(config)
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.message_retention_days.saturating_mul(86_400))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    pub fn provisioning_code_ttl(&self) -> Duration {
        Duration::from_secs(self.provisioning_code_ttl_secs)
    }

    pub fn rendezvous_ttl(&self) -> Duration {
        Duration::from_secs(self.rendezvous_ttl_secs)
    }

    pub fn device_cache_ttl(&self) -> Duration {
        Duration::from_millis(self.device_cache_ttl_ms)
    }

    pub fn sender_certificate_lifetime(&self) -> Duration {
        Duration::from_secs(self.sender_certificate_hours * 3600)
    }

    pub fn push_coalesce(&self) -> Duration {
        Duration::from_secs(self.push_coalesce_secs)
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_interval_secs.max(1))
    }

    /// The storage keys (`storage_key`, `storage_key_previous`), decoded;
    /// `None` when encryption at rest is off. The error names the variable
    /// and never shows its value.
    pub fn storage_keys(&self) -> Result<Option<StorageKeys>, ConfigError> {
        let name = |which| match which {
            WhichKey::Current => "storage_key (COURIER_STORAGE_KEY)",
            WhichKey::Previous => "storage_key_previous (COURIER_STORAGE_KEY_PREVIOUS)",
        };
        match (&self.storage_key, &self.storage_key_previous) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(ConfigError::Invalid(format!(
                "{} is set without {}: the previous key only reads rows while a current \
                 one writes",
                name(WhichKey::Previous),
                name(WhichKey::Current)
            ))),
            (Some(current), previous) => StorageKeys::from_base64(current, previous.as_deref())
                .map(Some)
                .map_err(|(which, e)| ConfigError::Invalid(format!("{} {e}", name(which)))),
        }
    }

    /// The effective configuration as TOML, with secrets masked (`courier config`).
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.registration_token.is_some() {
            shown.registration_token = Some("********".into());
        }
        for key in [&mut shown.storage_key, &mut shown.storage_key_previous] {
            if key.is_some() {
                *key = Some("********".into());
            }
        }
        shown.database_url = mask_url_password(&shown.database_url);
        shown.redis_url = shown.redis_url.as_deref().map(mask_url_password);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// The file as a TOML table to overlay. It must make a configuration on its
/// own, as it always had to: its errors are reported against it, with line
/// and column, and an environment variable does not hide them.
fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse = |source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    };
    toml::from_str::<Config>(&text).map_err(parse)?;
    toml::from_str(&text).map_err(parse)
}

/// `postgres://user:secret@host/db` → `postgres://user:********@host/db`.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:********@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Environment variables as the loader wants them (testable without touching
/// the real process environment).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("COURIER_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limit;

    pub(super) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_nothing() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.bind, "127.0.0.1:8080");
        assert_eq!(c.ack_timeout(), Duration::from_secs(2));
        assert_eq!(c.message_retention_days, 30);
        assert!(c.database_url.ends_with("courier.db"));
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "bind = \"0.0.0.0:9000\"\nack_timeout_ms = 50\n[limits]\nregister_per_ip = \"3/min\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("COURIER_ACK_TIMEOUT_MS", "75"),
                ("COURIER_LIMIT_SENDS_PER_ACCOUNT", "10/s"),
                ("COURIER_RATE_LIMITS", "off"),
                ("COURIER_TEST_POSTGRES_URL", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.bind, "0.0.0.0:9000");
        assert_eq!(c.ack_timeout_ms, 75);
        assert_eq!(
            c.limits[Limit::RegisterPerIp],
            Rate::new(3, Duration::from_secs(60))
        );
        assert_eq!(
            c.limits[Limit::SendsPerAccount],
            Rate::new(10, Duration::from_secs(1))
        );
        assert!(!c.rate_limits);
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        assert!(Config::load(None, env(&[("COURIER_ACK_TIMEOUT_MS", "soon")])).is_err());
        assert!(Config::load(None, env(&[("COURIER_ACK_TIMEOUT_MS", "0")])).is_err());
        assert!(Config::load(None, env(&[("COURIER_LIMIT_NOPE", "1/s")])).is_err());
        assert!(Config::load(None, env(&[("COURIER_LIMIT_LINK_PER_IP", "0/s")])).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "bnid = \"typo\"\n").unwrap();
        assert!(Config::load(Some(&path), env(&[])).is_err());
    }

    /// A rate past `Instant`'s range is refused from the environment too (see `rate.rs`).
    #[test]
    fn absurd_limit_periods_are_config_errors() {
        assert!(Config::load(
            None,
            env(&[("COURIER_LIMIT_LINK_PER_IP", "1/9223372036854775807s")])
        )
        .is_err());
    }

    /// The file must be a configuration on its own: an error in it is
    /// reported against the file, with its line, even when the environment
    /// sets the same key.
    #[test]
    fn file_errors_are_not_hidden_by_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "bind = \"x\"\nack_timeout_ms = \"soon\"\n").unwrap();
        let err = Config::load(Some(&path), env(&[("COURIER_ACK_TIMEOUT_MS", "75")])).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("line 2") && shown.contains("ack_timeout_ms"),
            "{shown}"
        );
    }

    /// `courier config` prints what loads back as the same configuration.
    #[test]
    fn printed_configuration_loads_back() {
        let mut c = Config::default();
        c.limits[Limit::BundleFetchPerPair] = Rate::new(5, Duration::from_secs(30));
        c.trusted_proxies = vec!["192.0.2.1".parse().unwrap()];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, c.to_masked_toml()).unwrap();
        let loaded = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(loaded.to_masked_toml(), c.to_masked_toml());
        assert_eq!(loaded.limits, c.limits);
    }

    #[test]
    fn masked_output_hides_secrets() {
        let c = Config {
            registration_token: Some("hunter2-token".into()),
            database_url: "postgres://courier:s3cret@db/courier".into(),
            ..Config::default()
        };
        let shown = c.to_masked_toml();
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("postgres://courier:********@db/courier"));
        let keyed = Config {
            storage_key: Some(key_b64(1)),
            storage_key_previous: Some(key_b64(2)),
            ..Config::default()
        };
        let shown = keyed.to_masked_toml();
        assert!(!shown.contains(&key_b64(1)) && !shown.contains(&key_b64(2)));
        assert!(shown.contains("storage_key = \"********\""), "{shown}");
        assert!(
            shown.contains("storage_key_previous = \"********\""),
            "{shown}"
        );
    }

    pub(super) fn key_b64(fill: u8) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([fill; 32])
    }

    /// Storage keys must be base64 of exactly 32 bytes, the previous key
    /// needs a current one and must differ from it; a refusal names the
    /// variable and never echoes the value.
    #[test]
    fn storage_keys_are_checked_at_load() {
        let ok = Config::load(
            None,
            env(&[
                ("COURIER_STORAGE_KEY", &key_b64(1)),
                ("COURIER_STORAGE_KEY_PREVIOUS", &key_b64(2)),
            ]),
        )
        .unwrap();
        let keys = ok.storage_keys().unwrap().unwrap();
        assert_eq!(
            keys.previous_id(),
            Some(crate::domain::at_rest::key_id(&[2; 32]))
        );
        assert!(Config::default().storage_keys().unwrap().is_none());
        use base64::Engine as _;
        let short = base64::engine::general_purpose::STANDARD.encode([9u8; 31]);
        for (vars, named) in [
            (
                vec![("COURIER_STORAGE_KEY", "c2VjcmV0LXZhbHVl!")],
                "COURIER_STORAGE_KEY",
            ),
            (
                vec![("COURIER_STORAGE_KEY", short.as_str())],
                "COURIER_STORAGE_KEY",
            ),
            (
                vec![("COURIER_STORAGE_KEY_PREVIOUS", key_b64(2).as_str())],
                "COURIER_STORAGE_KEY_PREVIOUS",
            ),
            (
                vec![
                    ("COURIER_STORAGE_KEY", key_b64(1).as_str()),
                    ("COURIER_STORAGE_KEY_PREVIOUS", short.as_str()),
                ],
                "COURIER_STORAGE_KEY_PREVIOUS",
            ),
            (
                vec![
                    ("COURIER_STORAGE_KEY", key_b64(1).as_str()),
                    ("COURIER_STORAGE_KEY_PREVIOUS", key_b64(1).as_str()),
                ],
                "COURIER_STORAGE_KEY_PREVIOUS",
            ),
        ] {
            let err = Config::load(None, env(&vars)).unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains(named), "{shown}");
            for (_, value) in &vars {
                assert!(!shown.contains(value), "{shown} echoes a key");
            }
        }
    }
}
