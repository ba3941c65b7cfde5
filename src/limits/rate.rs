//! Rates (`"20/h"`) and the `[limits]` table of them, one per [`Limit`].

use std::fmt;
use std::ops::{Index, IndexMut};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Limit;

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
            .find(|(u, _)| secs.is_multiple_of(*u))
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
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// The rate of every [`Limit`], indexed by it: `config.limits[Limit::SendsPerAccount]`.
/// `[limits]` in TOML (`register_per_ip = "20/h"`), `COURIER_LIMIT_<NAME>` in
/// the environment; a limit not given keeps its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits([Rate; Limit::COUNT]);

impl Default for Limits {
    fn default() -> Self {
        Limits(Limit::ALL.map(Limit::default_rate))
    }
}

impl Index<Limit> for Limits {
    type Output = Rate;

    fn index(&self, limit: Limit) -> &Rate {
        &self.0[limit as usize]
    }
}

impl IndexMut<Limit> for Limits {
    fn index_mut(&mut self, limit: Limit) -> &mut Rate {
        &mut self.0[limit as usize]
    }
}

/// `name = "rate"` for every limit, in table order.
impl Serialize for Limits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(Limit::COUNT))?;
        for limit in Limit::ALL {
            map.serialize_entry(limit.name(), &self[limit])?;
        }
        map.end()
    }
}

/// Any subset of the limits by name, the rest at their defaults; an unknown
/// name is an error, as for every other table of the configuration.
impl<'de> Deserialize<'de> for Limits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LimitsVisitor;

        impl<'de> Visitor<'de> for LimitsVisitor {
            type Value = Limits;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // What the derived `Deserialize` said.
                f.write_str("struct Limits")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Limits, A::Error> {
                let mut limits = Limits::default();
                while let Some(limit) = map.next_key::<Limit>()? {
                    limits[limit] = map.next_value()?;
                }
                Ok(limits)
            }
        }

        d.deserialize_map(LimitsVisitor)
    }
}

/// A limit by its name.
impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Limit::from_name(&name).ok_or_else(|| de::Error::unknown_field(&name, &Limit::NAMES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    /// `[limits]` takes any subset by name, refuses unknown names, and prints
    /// every limit back in table order.
    #[test]
    fn limits_table_round_trips() {
        let limits: Limits =
            toml::from_str("sends_per_account = \"10/s\"\nlink_per_ip = \"3/min\"\n").unwrap();
        for limit in Limit::ALL {
            let expected = match limit {
                Limit::SendsPerAccount => Rate::new(10, Duration::from_secs(1)),
                Limit::LinkPerIp => Rate::new(3, Duration::from_secs(60)),
                _ => limit.default_rate(),
            };
            assert_eq!(limits[limit], expected, "{limit:?}");
        }
        let shown = toml::to_string(&limits).unwrap();
        let names: Vec<&str> = shown
            .lines()
            .filter_map(|l| l.split(" = ").next())
            .collect();
        assert_eq!(names, Limit::NAMES);
        assert_eq!(toml::from_str::<Limits>(&shown).unwrap(), limits);
        let err = toml::from_str::<Limits>("nope = \"1/s\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `nope`"), "{err}");
    }
}
