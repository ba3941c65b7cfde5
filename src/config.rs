//! Configuration: serde defaults, overlaid by an optional TOML file, overlaid
//! by `COURIER_*` environment variables. `courier serve` with neither works.
//!
//! Fields carry their unit in the name (`ack_timeout_ms`), as the environment
//! variables do; the accessors turn them into `Duration`s once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
            drain_timeout_ms: 10_000,
            sweep_interval_secs: 600,
            device_cache_ttl_ms: 5_000,
            db_pool_size: 16,
            workers: 0,
            rate_limits: true,
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// `courier.db` in `$STATE_DIRECTORY` under systemd, else in the working directory.
fn default_database_url() -> String {
    let dir = std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            // systemd passes a colon-separated list when several are configured.
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("."));
    dir.join("courier.db").to_string_lossy().into_owned()
}

/// The named rate limits (`[limits]` in TOML, `COURIER_LIMIT_<NAME>` in the environment).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// `POST /v1/accounts` per client IP.
    pub register_per_ip: Rate,
    /// `POST /v1/devices` (linking) per client IP.
    pub link_per_ip: Rate,
    /// Failed authentications per client IP (password guessing).
    pub auth_failures_per_ip: Rate,
    /// Message sends per sending account.
    pub sends_per_account: Rate,
    /// Prekey-bundle fetches per fetching account.
    pub bundle_fetch_per_account: Rate,
    /// Prekey-bundle fetches per (fetching account, target account): bounds
    /// how fast anyone can drain one user's one-time keys.
    pub bundle_fetch_per_pair: Rate,
    /// Provisioning codes per account.
    pub provisioning_per_account: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            register_per_ip: Rate::new(20, Duration::from_secs(3600)),
            link_per_ip: Rate::new(20, Duration::from_secs(3600)),
            auth_failures_per_ip: Rate::new(100, Duration::from_secs(60)),
            sends_per_account: Rate::new(6_000, Duration::from_secs(60)),
            bundle_fetch_per_account: Rate::new(600, Duration::from_secs(60)),
            bundle_fetch_per_pair: Rate::new(60, Duration::from_secs(3600)),
            provisioning_per_account: Rate::new(20, Duration::from_secs(3600)),
        }
    }
}

impl Limits {
    fn set(&mut self, name: &str, value: Rate) -> Result<(), String> {
        let slot = match name {
            "register_per_ip" => &mut self.register_per_ip,
            "link_per_ip" => &mut self.link_per_ip,
            "auth_failures_per_ip" => &mut self.auth_failures_per_ip,
            "sends_per_account" => &mut self.sends_per_account,
            "bundle_fetch_per_account" => &mut self.bundle_fetch_per_account,
            "bundle_fetch_per_pair" => &mut self.bundle_fetch_per_pair,
            "provisioning_per_account" => &mut self.provisioning_per_account,
            _ => return Err(format!("no limit named {name}")),
        };
        *slot = value;
        Ok(())
    }
}

/// A GCRA rate: `count` requests per `per`, with a burst of `count`.
/// Written `"20/h"`, `"100/s"`, `"6000/min"`, `"5/30s"` or `"1/d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The longest period a rate may have: 100 years, far beyond any real limit and far below
    /// what the limiter's `Instant` arithmetic can hold.
    pub const MAX_PERIOD_SECS: u64 = 36_500 * 86_400;

    pub const fn new(count: u32, per: Duration) -> Self {
        Rate { count, per }
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a rate like \"20/h\" or \"100/s\"");
        let (count, period) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = period.trim();
        let split = period.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = period.split_at(split);
        let n: u64 = if n.is_empty() {
            1
        } else {
            n.parse().map_err(|_| bad())?
        };
        let unit_secs = match unit {
            "s" | "sec" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        if count == 0 || n == 0 {
            return Err(format!("{s:?}: a rate needs a positive count and period"));
        }
        // `n * unit_secs` can overflow ("1/99999999999999999d"), and a period too long for
        // `Instant` arithmetic makes the limiter panic on its first check: refuse both here.
        match n.checked_mul(unit_secs) {
            Some(secs) if secs <= Rate::MAX_PERIOD_SECS => {
                Ok(Rate::new(count, Duration::from_secs(secs)))
            }
            _ => Err(format!("{s:?}: a rate's period is at most 36500 days")),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.per.as_secs();
        let (n, unit) = [(86_400, "d"), (3600, "h"), (60, "min")]
            .into_iter()
            .find(|(u, _)| secs % u == 0)
            .map(|(u, name)| (secs / u, name))
            .unwrap_or((secs, "s"));
        if n == 1 {
            write!(f, "{}/{}", self.count, unit)
        } else {
            write!(f, "{}/{}{}", self.count, n, unit)
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Defaults ← the TOML file (if any) ← `COURIER_*` variables of `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })?
            }
            None => Config::default(),
        };
        for (name, value) in env {
            if let Some(key) = name.strip_prefix("COURIER_") {
                config
                    .apply_env(key, &value)
                    .map_err(|reason| ConfigError::Env {
                        name: name.clone(),
                        reason,
                    })?;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// One `COURIER_<KEY>` override. Unknown keys are ignored with a warning so
    /// that tooling variables (e.g. `COURIER_TEST_POSTGRES_URL`) do not stop a server.
    fn apply_env(&mut self, key: &str, value: &str) -> Result<(), String> {
        fn num<T: FromStr>(v: &str) -> Result<T, String> {
            v.trim()
                .parse()
                .map_err(|_| format!("{v:?} is not a number"))
        }
        match key {
            "BIND" => self.bind = value.to_owned(),
            "DATABASE_URL" => self.database_url = value.to_owned(),
            "REGISTRATION_TOKEN" => {
                self.registration_token = (!value.is_empty()).then(|| value.to_owned())
            }
            "ACK_TIMEOUT_MS" => self.ack_timeout_ms = num(value)?,
            "MESSAGE_RETENTION_DAYS" => self.message_retention_days = num(value)?,
            "MAX_INFLIGHT_SENDS" => self.max_inflight_sends = num(value)?,
            "MAILBOX_MAX_MESSAGES" => self.mailbox_max_messages = num(value)?,
            "MAX_ONE_TIME_KEYS" => self.max_one_time_keys = num(value)?,
            "MAX_DEVICES" => self.max_devices = num(value)?,
            "PROVISIONING_CODE_TTL_SECS" => self.provisioning_code_ttl_secs = num(value)?,
            "DRAIN_TIMEOUT_MS" => self.drain_timeout_ms = num(value)?,
            "SWEEP_INTERVAL_SECS" => self.sweep_interval_secs = num(value)?,
            "DEVICE_CACHE_TTL_MS" => self.device_cache_ttl_ms = num(value)?,
            "DB_POOL_SIZE" => self.db_pool_size = num(value)?,
            "WORKERS" => self.workers = num(value)?,
            "RATE_LIMITS" => {
                self.rate_limits = match value.trim().to_ascii_lowercase().as_str() {
                    "on" | "true" | "1" | "yes" => true,
                    "off" | "false" | "0" | "no" => false,
                    _ => return Err(format!("{value:?} is not on/off")),
                }
            }
            "TRUSTED_PROXIES" => {
                self.trusted_proxies = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().map_err(|_| format!("{s:?} is not an IP address")))
                    .collect::<Result<_, _>>()?
            }
            other => match other.strip_prefix("LIMIT_") {
                Some(limit) => self
                    .limits
                    .set(&limit.to_ascii_lowercase(), value.parse()?)?,
                None => log::warn!("ignoring unknown setting COURIER_{other}"),
            },
        }
        Ok(())
    }

    /// Every numeric key with its value and the range it must fall in
    /// (README.md lists the same ranges). Outside them a value is refused at
    /// start rather than trusted: an `ack_timeout_ms` near `u64::MAX` made
    /// `Instant::now() + ack_timeout` panic on the first live push, a
    /// cache TTL of years would let another process's deleted device in for
    /// years. The ranges are wide; they only exclude nonsense.
    pub fn numeric_keys(&self) -> [(&'static str, u64, RangeInclusive<u64>); 12] {
        let wide = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        [
            ("ack_timeout_ms", self.ack_timeout_ms, 10..=600_000),
            (
                "message_retention_days",
                self.message_retention_days,
                1..=3_650,
            ),
            (
                "max_inflight_sends",
                wide(self.max_inflight_sends),
                1..=100_000,
            ),
            (
                "mailbox_max_messages",
                self.mailbox_max_messages,
                1..=100_000_000,
            ),
            ("max_one_time_keys", self.max_one_time_keys, 1..=1_000_000),
            ("max_devices", u64::from(self.max_devices), 1..=1_000),
            (
                "provisioning_code_ttl_secs",
                self.provisioning_code_ttl_secs,
                1..=86_400,
            ),
            ("drain_timeout_ms", self.drain_timeout_ms, 1..=600_000),
            ("sweep_interval_secs", self.sweep_interval_secs, 1..=86_400),
            ("device_cache_ttl_ms", self.device_cache_ttl_ms, 0..=600_000),
            ("db_pool_size", u64::from(self.db_pool_size), 1..=1_000),
            ("workers", wide(self.workers), 0..=1_024),
        ]
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, value, range) in self.numeric_keys() {
            if !range.contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{name} (COURIER_{}) is {value}; it must be between {} and {}",
                    name.to_ascii_uppercase(),
                    range.start(),
                    range.end()
                )));
            }
        }
        if self.registration_token.as_deref() == Some("") {
            return Err(ConfigError::Invalid(
                "registration_token must not be empty (leave it unset for open registration)"
                    .into(),
            ));
        }
        Ok(())
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

    pub fn device_cache_ttl(&self) -> Duration {
        Duration::from_millis(self.device_cache_ttl_ms)
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_interval_secs.max(1))
    }

    /// The effective configuration as TOML, with secrets masked (`courier config`).
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.registration_token.is_some() {
            shown.registration_token = Some("********".into());
        }
        shown.database_url = mask_url_password(&shown.database_url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
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

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
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
            c.limits.register_per_ip,
            Rate::new(3, Duration::from_secs(60))
        );
        assert_eq!(
            c.limits.sends_per_account,
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

    /// Each numeric key is accepted at both ends of its range and refused
    /// just past them, from the environment as from a file, with a message
    /// that names the key.
    #[test]
    fn numeric_keys_are_bounded() {
        assert!(Config::default().validate().is_ok());
        for (name, _, range) in Config::default().numeric_keys() {
            let var = format!("COURIER_{}", name.to_ascii_uppercase());
            for ok in [*range.start(), *range.end()] {
                let loaded = Config::load(None, env(&[(&var, &ok.to_string())]));
                assert!(loaded.is_ok(), "{var}={ok}: {:?}", loaded.err());
            }
            let mut bad = vec![range.end() + 1, u64::MAX];
            if *range.start() > 0 {
                bad.push(range.start() - 1);
            }
            for value in bad {
                let err = Config::load(None, env(&[(&var, &value.to_string())]))
                    .err()
                    .unwrap_or_else(|| panic!("{var}={value} accepted"));
                let shown = err.to_string();
                assert!(shown.contains(name) || shown.contains(&var), "{shown}");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "ack_timeout_ms = 18446744073709551615\n").unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("ack_timeout_ms"), "{err}");
    }

    #[test]
    fn rates_round_trip() {
        for s in ["20/h", "100/s", "6000/min", "5/30s", "1/d", "7/2h"] {
            let r: Rate = s.parse().unwrap();
            assert_eq!(r.to_string().parse::<Rate>().unwrap(), r, "{s}");
        }
        assert!("x/h".parse::<Rate>().is_err());
        assert!("5/fortnight".parse::<Rate>().is_err());
    }

    /// Found by the `account_bodies` fuzz target: `n * unit` overflowed (a panic in debug builds,
    /// a silently wrong period in release), and periods past `Instant`'s range made the limiter
    /// panic on its first check. Both are now config errors.
    #[test]
    fn absurd_periods_are_errors_not_panics() {
        for s in [
            "2/8888488888888881h",
            "1/99999999999999999d",
            "1/18446744073709551615s",
            "1/9223372036854775807s",
            "1/36501d",
        ] {
            assert!(s.parse::<Rate>().is_err(), "{s}");
        }
        let longest: Rate = "1/36500d".parse().unwrap();
        assert_eq!(longest.per, Duration::from_secs(Rate::MAX_PERIOD_SECS));
        assert!(Config::load(
            None,
            env(&[("COURIER_LIMIT_LINK_PER_IP", "1/9223372036854775807s")])
        )
        .is_err());
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
    }
}
