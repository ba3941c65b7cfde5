//! The range of every numeric key, checked once the configuration is loaded.

use std::fmt::Display;
use std::ops::RangeInclusive;

use super::{Config, ConfigError};

impl Config {
    /// Every numeric key with its value and the range it must fall in
    /// (README.md lists the same ranges). Outside them a value is refused at
    /// start rather than trusted: an `ack_timeout_ms` near `u64::MAX` made
    /// `Instant::now() + ack_timeout` panic on the first live push, a
    /// cache TTL of years would let another process's deleted device in for
    /// years. The ranges are wide; they only exclude nonsense.
    pub fn numeric_keys(&self) -> [(&'static str, u64, RangeInclusive<u64>); 15] {
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
            ("rendezvous_ttl_secs", self.rendezvous_ttl_secs, 1..=86_400),
            ("drain_timeout_ms", self.drain_timeout_ms, 1..=600_000),
            ("sweep_interval_secs", self.sweep_interval_secs, 1..=86_400),
            ("device_cache_ttl_ms", self.device_cache_ttl_ms, 0..=600_000),
            ("db_pool_size", u64::from(self.db_pool_size), 1..=1_000),
            ("workers", wide(self.workers), 0..=1_024),
            ("push_coalesce_secs", self.push_coalesce_secs, 1..=86_400),
            (
                "sender_certificate_hours",
                self.sender_certificate_hours,
                1..=24 * 30,
            ),
        ]
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, value, range) in self.numeric_keys() {
            if !range.contains(&value) {
                return Err(out_of_range(name, value, &range));
            }
        }
        if let Some(redis) = &self.redis_url {
            if !redis.starts_with("redis://") && !redis.starts_with("rediss://") {
                return Err(ConfigError::Invalid(
                    "redis_url (COURIER_REDIS_URL) must be redis://HOST:PORT/DB".into(),
                ));
            }
            // The members of a cluster share one durable store; a SQLite
            // file is one machine's.
            if !self.database_url.starts_with("postgres://")
                && !self.database_url.starts_with("postgresql://")
            {
                return Err(ConfigError::Invalid(
                    "redis_url (COURIER_REDIS_URL) makes a cluster, whose nodes share one \
                     PostgreSQL database: set database_url to postgres://… (SQLite is one \
                     machine's)"
                        .into(),
                ));
            }
        }
        if self.cluster_name.is_empty()
            || self.cluster_name.len() > 64
            || !self
                .cluster_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::Invalid(
                "cluster_name must be 1 to 64 letters, digits, '-' or '_'".into(),
            ));
        }
        if !(self.push_subject.starts_with("mailto:") || self.push_subject.starts_with("https://"))
            || self.push_subject.len() > 256
        {
            return Err(ConfigError::Invalid(
                "push_subject must be a mailto: or https:// URI (RFC 8292)".into(),
            ));
        }
        self.storage_keys()?;
        if self.registration_token.as_deref() == Some("") {
            return Err(ConfigError::Invalid(
                "registration_token must not be empty (leave it unset for open registration)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The refusal of `value` for the numeric key `name`.
fn out_of_range(name: &str, value: impl Display, range: &RangeInclusive<u64>) -> ConfigError {
    ConfigError::Invalid(format!(
        "{name} (COURIER_{}) is {value}; it must be between {} and {}",
        name.to_ascii_uppercase(),
        range.start(),
        range.end()
    ))
}

/// The refusal of a number past `i64::MAX` (which TOML cannot hold) given to
/// the numeric key `name` in the environment: it is past every range, so it
/// is refused as `validate` would refuse it. `None` if `name` has no range.
pub(super) fn past_every_range(name: &str, value: u64) -> Option<ConfigError> {
    Config::default()
        .numeric_keys()
        .into_iter()
        .find(|(key, ..)| *key == name)
        .map(|(key, _, range)| out_of_range(key, value, &range))
}

#[cfg(test)]
mod tests {
    use super::super::tests::env;
    use super::*;

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

    /// A number TOML cannot hold is refused from the environment with the
    /// same message as any other number out of range.
    #[test]
    fn numbers_past_toml_are_refused_like_any_out_of_range() {
        let err = Config::load(
            None,
            env(&[("COURIER_ACK_TIMEOUT_MS", "18446744073709551615")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: ack_timeout_ms (COURIER_ACK_TIMEOUT_MS) is \
             18446744073709551615; it must be between 10 and 600000"
        );
    }
}
