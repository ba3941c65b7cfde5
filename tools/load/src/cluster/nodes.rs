//! What a cluster run needs around its nodes: a fresh PostgreSQL database
//! (created and dropped with `psql`, so the tool links no database client),
//! and the nodes' cluster counters from `/metrics`.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// A database this run created on a PostgreSQL server; dropped with it.
pub struct Database {
    admin_url: String,
    name: String,
    /// The URL the nodes get.
    pub url: String,
}

impl Database {
    /// Creates database `name` through `admin_url` (any database on the
    /// server, e.g. `postgres://postgres@127.0.0.1:5432/postgres`).
    pub fn create(admin_url: &str, name: &str) -> anyhow::Result<Database> {
        let mut url = reqwest::Url::parse(admin_url)
            .with_context(|| format!("PostgreSQL URL {admin_url:?}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            bail!("{admin_url:?} is not a postgres:// URL");
        }
        psql(admin_url, &format!("CREATE DATABASE {name}"))?;
        url.set_path(name);
        Ok(Database {
            admin_url: admin_url.to_owned(),
            name: name.to_owned(),
            url: url.to_string(),
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // FORCE: a node killed rather than stopped may leave a session.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = psql(&self.admin_url, &sql) {
            eprintln!("courier-load: could not drop database {}: {e:#}", self.name);
        }
    }
}

/// Runs one SQL statement with `psql`.
pub fn psql(url: &str, sql: &str) -> anyhow::Result<()> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        // A server that is not there should not hold the run up.
        .env("PGCONNECT_TIMEOUT", "3")
        .stdin(Stdio::null())
        .output()
        .context("run psql (PostgreSQL's client; needed to create the run's database)")?;
    if !out.status.success() {
        bail!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The cluster counters of one node's `/metrics` (Prometheus text).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    pub forwards: f64,
    pub confirmations: f64,
    pub fallback_spills: f64,
    pub bus_errors: f64,
}

impl Counters {
    pub fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut it = line.split_whitespace();
            let (Some(name), Some(value)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            // Matched by suffix: the exposition may carry a namespace
            // (`courier_cluster_forwards_total`).
            if name.ends_with("cluster_forwards_total") {
                c.forwards += v;
            } else if name.ends_with("cluster_confirmations_total") {
                c.confirmations += v;
            } else if name.ends_with("cluster_fallback_spills_total") {
                c.fallback_spills += v;
            } else if name.ends_with("cluster_bus_errors_total") {
                c.bus_errors += v;
            }
        }
        c
    }

    pub fn minus(&self, before: &Counters) -> Counters {
        Counters {
            forwards: self.forwards - before.forwards,
            confirmations: self.confirmations - before.confirmations,
            fallback_spills: self.fallback_spills - before.fallback_spills,
            bus_errors: self.bus_errors - before.bus_errors,
        }
    }

    pub fn plus(&self, o: &Counters) -> Counters {
        Counters {
            forwards: self.forwards + o.forwards,
            confirmations: self.confirmations + o.confirmations,
            fallback_spills: self.fallback_spills + o.fallback_spills,
            bus_errors: self.bus_errors + o.bus_errors,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "forwards": self.forwards,
            "confirmations": self.confirmations,
            "fallback_spills": self.fallback_spills,
            "bus_errors": self.bus_errors,
        })
    }
}

/// Reads `/metrics` of the node at `base` (`http://ADDR`).
pub async fn counters(http: &reqwest::Client, base: &str) -> anyhow::Result<Counters> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("GET {base}/metrics"))?
        .text()
        .await?;
    Ok(Counters::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_from_the_exposition() {
        let text = "# HELP courier_cluster_forwards_total Copies forwarded\n\
                    # TYPE courier_cluster_forwards_total counter\n\
                    courier_cluster_forwards_total 120\n\
                    courier_cluster_confirmations_total 118\n\
                    courier_cluster_fallback_spills_total 2\n\
                    courier_cluster_bus_errors_total 0\n\
                    courier_messages_sent_total 500\n";
        let c = Counters::parse(text);
        assert_eq!(
            (c.forwards, c.confirmations, c.fallback_spills),
            (120.0, 118.0, 2.0)
        );
        assert_eq!(c.minus(&c), Counters::default());
    }
}
