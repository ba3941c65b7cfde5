//! The `COURIER_*` environment, overlaid on the configuration file as TOML.
//!
//! Each variable becomes the TOML value it stands for, in the file's shape:
//! `COURIER_ACK_TIMEOUT_MS=75` is `ack_timeout_ms = 75`, and
//! `COURIER_LIMIT_LINK_PER_IP=5/min` is `[limits] link_per_ip = "5/min"`. A
//! value is read as the kind of its key's default: a number, a boolean
//! (`on`/`off`, `true`/`false`, `1`/`0`, `yes`/`no`), a comma-separated list,
//! or else a string. An empty value unsets a key that has no default
//! (`COURIER_REGISTRATION_TOKEN=`). The merged table is deserialized once
//! ([`super::Config::load`]), so a variable takes exactly what the file takes.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use toml::{Table, Value};

use super::{bounds, Config, ConfigError};
use crate::limits::Limit;

/// `COURIER_LIMIT_<NAME>` sets `<name>` in this table.
const LIMITS: &str = "limits";

/// The variables the overlay used, kept to tell which one a refused value
/// came from.
pub(super) struct Overlay(Vec<Setting>);

struct Setting {
    var: String,
    raw: String,
    /// `None` for a top-level key, `Some(LIMITS)` for a limit.
    section: Option<&'static str>,
    key: String,
    value: Value,
}

impl Setting {
    /// The refusal of this setting's `value` in place of its own, alone.
    fn refusal(&self, value: Value) -> Option<toml::de::Error> {
        let mut alone = Table::from_iter([(self.key.clone(), value)]);
        if let Some(section) = self.section {
            alone = Table::from_iter([(section.to_owned(), Value::Table(alone))]);
        }
        Config::deserialize(alone).err()
    }
}

/// Merges the `COURIER_*` variables of `env` into `table` (the file's, or an
/// empty one). A variable that names no key is ignored with a warning, so
/// that tooling variables (e.g. `COURIER_TEST_POSTGRES_URL`) do not stop a
/// server; `COURIER_LIMIT_<NAME>` naming no limit is an error.
pub(super) fn overlay(
    table: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Overlay, ConfigError> {
    let defaults = Table::try_from(Config::default())
        .map_err(|e| ConfigError::Invalid(format!("cannot render the defaults: {e}")))?;
    let fields = field_names::<Config>();
    let mut used = Vec::new();
    for (var, raw) in env {
        let Some(name) = var.strip_prefix("COURIER_") else {
            continue;
        };
        let refuse = |reason: String| ConfigError::Env {
            name: var.clone(),
            reason,
        };
        let field = fields
            .iter()
            .copied()
            .find(|field| field.to_ascii_uppercase() == name);
        let setting = match (field, field.and_then(|field| defaults.get(field))) {
            // A table (`limits`) is set a key at a time, not as one variable.
            (Some(_), Some(Value::Table(_))) => None,
            // No default: an optional key, which an empty value leaves unset.
            (Some(key), None) if raw.is_empty() => {
                table.remove(key);
                continue;
            }
            (Some(key), default) => Some((None, key.to_owned(), read(key, &raw, default, refuse)?)),
            (None, _) => match name.strip_prefix("LIMIT_") {
                Some(limit) => {
                    let limit = limit.to_ascii_lowercase();
                    if Limit::from_name(&limit).is_none() {
                        return Err(refuse(format!("no limit named {limit}")));
                    }
                    Some((Some(LIMITS), limit, Value::String(raw.clone())))
                }
                None => None,
            },
        };
        let Some((section, key, value)) = setting else {
            log::warn!("ignoring unknown setting {var}");
            continue;
        };
        let slot = match section {
            None => Some(&mut *table),
            // The file was checked on its own, so `[limits]` is a table if it is there.
            Some(section) => match table
                .entry(section)
                .or_insert_with(|| Value::Table(Table::new()))
            {
                Value::Table(inner) => Some(inner),
                _ => None,
            },
        };
        if let Some(slot) = slot {
            slot.insert(key.clone(), value.clone());
        }
        used.push(Setting {
            var,
            raw,
            section,
            key,
            value,
        });
    }
    Ok(Overlay(used))
}

/// `raw` as a TOML value of the kind of `default` (a string if it has none).
fn read(
    key: &str,
    raw: &str,
    default: Option<&Value>,
    refuse: impl Fn(String) -> ConfigError,
) -> Result<Value, ConfigError> {
    Ok(match default {
        // Every numeric key is a count or a duration: unsigned.
        Some(Value::Integer(_)) => match raw.trim().parse::<u64>() {
            Ok(n) => match i64::try_from(n) {
                Ok(n) => Value::Integer(n),
                Err(_) => {
                    return Err(bounds::past_every_range(key, n)
                        .unwrap_or_else(|| refuse(format!("{raw:?} is too large"))))
                }
            },
            Err(_) => return Err(refuse(format!("{raw:?} is not a number"))),
        },
        Some(Value::Boolean(_)) => match raw.trim().to_ascii_lowercase().as_str() {
            "on" | "true" | "1" | "yes" => Value::Boolean(true),
            "off" | "false" | "0" | "no" => Value::Boolean(false),
            _ => return Err(refuse(format!("{raw:?} is not on/off"))),
        },
        Some(Value::Array(_)) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| Value::String(item.to_owned()))
                .collect(),
        ),
        _ => Value::String(raw.to_owned()),
    })
}

impl Overlay {
    /// The refusal of the merged table, laid on the first variable whose
    /// value is refused on its own (the file alone was accepted before the
    /// overlay, and keys do not depend on one another).
    pub(super) fn blame(&self, merged: toml::de::Error) -> ConfigError {
        self.0
            .iter()
            .find_map(|setting| {
                let refused = setting.refusal(setting.value.clone())?;
                let reason = match &setting.value {
                    // Too large for the key's type (`max_devices` is a `u32`).
                    Value::Integer(_) => format!("{:?} is not a number", setting.raw),
                    // Name the item refused.
                    Value::Array(items) => items
                        .iter()
                        .find_map(|item| {
                            let refused = setting.refusal(Value::Array(vec![item.clone()]))?;
                            Some(format!("{item} is refused: {}", refused.message()))
                        })
                        .unwrap_or_else(|| refused.message().to_owned()),
                    _ => refused.message().to_owned(),
                };
                Some(ConfigError::Env {
                    name: setting.var.clone(),
                    reason,
                })
            })
            .unwrap_or_else(|| ConfigError::Invalid(merged.to_string().trim_end().to_owned()))
    }
}

/// The names of `T`'s fields. serde's derive hands them to
/// `deserialize_struct`, and this deserializer answers with them.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Fields(&'static [&'static str]);

    impl fmt::Display for Fields {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "fields {:?}", self.0)
        }
    }

    impl std::error::Error for Fields {}

    impl de::Error for Fields {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Fields(&[])
        }
    }

    struct Names;

    impl<'de> Deserializer<'de> for Names {
        type Error = Fields;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    match T::deserialize(Names) {
        Err(Fields(fields)) => fields,
        Ok(_) => &[],
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::env;
    use super::super::Rate;
    use super::*;

    /// Every key of the file can be set from the environment: the overlay
    /// knows every field, the optional ones included.
    #[test]
    fn every_key_has_its_variable() {
        let fields = field_names::<Config>();
        let defaults = Table::try_from(Config::default()).unwrap();
        assert!(fields.contains(&"registration_token"));
        for key in defaults.keys() {
            assert!(fields.contains(&key.as_str()), "{key}");
        }
        for field in fields.iter().filter(|&&f| f != LIMITS) {
            let shown = match defaults.get(*field) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(_)) => "192.0.2.1, 2001:db8::1".into(),
                Some(other) => other.to_string(),
                None => "set".into(),
            };
            let var = format!("COURIER_{}", field.to_ascii_uppercase());
            let key = super::super::tests::key_b64(1);
            // A Redis URL is a cluster's, which needs PostgreSQL.
            let loaded = if *field == "redis_url" {
                Config::load(
                    None,
                    env(&[
                        (&var, "redis://127.0.0.1:6379/0"),
                        ("COURIER_DATABASE_URL", "postgres://db/courier"),
                    ]),
                )
            } else if *field == "storage_key" {
                Config::load(None, env(&[(&var, &key)]))
            } else if *field == "storage_key_previous" {
                // The previous key needs a current one.
                let current = super::super::tests::key_b64(2);
                Config::load(
                    None,
                    env(&[(&var, &key), ("COURIER_STORAGE_KEY", &current)]),
                )
            } else {
                Config::load(None, env(&[(&var, &shown)]))
            };
            assert!(loaded.is_ok(), "{var}={shown}: {:?}", loaded.err());
        }
    }

    /// `COURIER_LIMIT_<NAME>` sets that limit and no other, whatever the case
    /// of `<NAME>`.
    #[test]
    fn each_limit_variable_sets_exactly_its_limit() {
        let set = Rate::new(7, Duration::from_secs(30));
        for limit in Limit::ALL {
            for var in [
                format!("COURIER_LIMIT_{}", limit.name().to_ascii_uppercase()),
                format!("COURIER_LIMIT_{}", limit.name()),
            ] {
                let c = Config::load(None, env(&[(&var, "7/30s")])).unwrap();
                for other in Limit::ALL {
                    let expected = if other == limit {
                        set
                    } else {
                        other.default_rate()
                    };
                    assert_eq!(c.limits[other], expected, "{var} and {other:?}");
                }
            }
        }
    }

    /// Over a file that sets each of them, the environment wins for a number,
    /// a boolean, a list, a string, a limit and the registration token, which
    /// an empty value unsets; what it does not name keeps the file's value.
    #[test]
    fn the_environment_overlays_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "bind = \"0.0.0.0:9000\"\nack_timeout_ms = 50\nmax_devices = 3\n\
             rate_limits = false\ntrusted_proxies = [\"192.0.2.1\"]\n\
             registration_token = \"from-file\"\n\
             [limits]\nregister_per_ip = \"3/min\"\nlink_per_ip = \"4/min\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("COURIER_ACK_TIMEOUT_MS", " 75 "),
                ("COURIER_RATE_LIMITS", "Yes"),
                ("COURIER_TRUSTED_PROXIES", "10.0.0.1, ::1,"),
                ("COURIER_DATABASE_URL", "/tmp/x.db"),
                ("COURIER_LIMIT_LINK_PER_IP", "10/s"),
                ("COURIER_REGISTRATION_TOKEN", "from-env"),
            ]),
        )
        .unwrap();
        assert_eq!(c.bind, "0.0.0.0:9000");
        assert_eq!(c.ack_timeout_ms, 75);
        assert_eq!(c.max_devices, 3);
        assert!(c.rate_limits);
        let proxies: Vec<std::net::IpAddr> =
            vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        assert_eq!(c.trusted_proxies, proxies);
        assert_eq!(c.database_url, "/tmp/x.db");
        assert_eq!(
            c.limits[Limit::RegisterPerIp],
            Rate::new(3, Duration::from_secs(60))
        );
        assert_eq!(
            c.limits[Limit::LinkPerIp],
            Rate::new(10, Duration::from_secs(1))
        );
        assert_eq!(c.registration_token.as_deref(), Some("from-env"));

        let unset = Config::load(
            Some(&path),
            env(&[
                ("COURIER_REGISTRATION_TOKEN", ""),
                ("COURIER_TRUSTED_PROXIES", ""),
                ("COURIER_RATE_LIMITS", "off"),
            ]),
        )
        .unwrap();
        assert_eq!(unset.registration_token, None);
        assert!(unset.trusted_proxies.is_empty());
        assert!(!unset.rate_limits);
    }

    /// A refused value names its variable, whether the overlay or the
    /// deserialization of the merged table refuses it.
    #[test]
    fn refusals_name_the_variable() {
        for (var, value, reason) in [
            ("COURIER_ACK_TIMEOUT_MS", "soon", "\"soon\" is not a number"),
            ("COURIER_RATE_LIMITS", "maybe", "\"maybe\" is not on/off"),
            ("COURIER_LIMIT_NOPE", "1/s", "no limit named nope"),
            (
                "COURIER_LIMIT_LINK_PER_IP",
                "0/s",
                "a rate needs a positive",
            ),
            (
                "COURIER_TRUSTED_PROXIES",
                "10.0.0.1,nope",
                "\"nope\" is refused",
            ),
            ("COURIER_MAX_DEVICES", "-1", "\"-1\" is not a number"),
            (
                "COURIER_MAX_DEVICES",
                "5000000000",
                "\"5000000000\" is not a number",
            ),
        ] {
            let err = Config::load(None, env(&[(var, value)]))
                .err()
                .unwrap_or_else(|| panic!("{var}={value} accepted"));
            let shown = err.to_string();
            assert!(
                shown.starts_with(&format!("environment variable {var}: ")),
                "{shown}"
            );
            assert!(shown.contains(reason), "{shown}");
        }
    }

    /// Variables naming no key are ignored, as are keys written in lower case
    /// and `COURIER_LIMITS` (a table, not a value).
    #[test]
    fn unknown_variables_are_ignored() {
        let c = Config::load(
            None,
            env(&[
                ("COURIER_TEST_POSTGRES_URL", "postgres://x"),
                ("COURIER_ack_timeout_ms", "soon"),
                ("COURIER_LIMITS", "x"),
                ("NOT_COURIER_BIND", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.ack_timeout_ms, Config::default().ack_timeout_ms);
        assert_eq!(c.limits, Config::default().limits);
    }
}
