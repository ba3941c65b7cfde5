//! What the tool reads of Redis (`PING`, `INFO`, `SCAN`) to measure what a
//! cluster costs it, through redis-rs.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

const TIMEOUT: Duration = Duration::from_secs(2);

/// One connection to the Redis the nodes use.
pub struct Redis {
    conn: MultiplexedConnection,
}

impl Redis {
    /// `redis://[[user]:password@]host[:port][/db]`, as the nodes are given.
    pub async fn connect(url: &str) -> anyhow::Result<Redis> {
        let client = redis::Client::open(url).with_context(|| format!("Redis URL {url:?}"))?;
        let conn = tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .with_context(|| format!("connect to Redis at {url}: timed out"))?
            .with_context(|| format!("connect to Redis at {url}"))?;
        Ok(Redis { conn })
    }

    async fn timed<T>(
        &mut self,
        what: &str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout(TIMEOUT, f)
            .await
            .with_context(|| format!("Redis {what}: timed out"))?
            .with_context(|| format!("Redis {what}"))
    }

    pub async fn ping(&mut self) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let pong: String = self
            .timed("PING", redis::cmd("PING").query_async(&mut conn))
            .await?;
        anyhow::ensure!(pong == "PONG", "PING answered {pong:?}");
        Ok(())
    }

    /// `INFO all`, parsed.
    pub async fn info(&mut self) -> anyhow::Result<Info> {
        let mut conn = self.conn.clone();
        let text: String = self
            .timed("INFO", redis::cmd("INFO").arg("all").query_async(&mut conn))
            .await?;
        Ok(Info::parse(&text))
    }

    /// How many keys match `pattern` (a full `SCAN`: fine for the few keys
    /// one load run leaves, and it does not block Redis as `KEYS` would).
    pub async fn count_keys(&mut self, pattern: &str) -> anyhow::Result<u64> {
        let mut conn = self.conn.clone();
        let count = async move {
            let mut keys = conn.scan_match::<_, String>(pattern).await?;
            let mut n = 0u64;
            while let Some(key) = futures_util::StreamExt::next(&mut keys).await {
                key?;
                n += 1;
            }
            Ok(n)
        };
        self.timed("SCAN", count).await
    }
}

/// The `field:value` lines of `INFO`.
#[derive(Clone, Debug, Default)]
pub struct Info {
    fields: BTreeMap<String, String>,
}

impl Info {
    pub fn parse(text: &str) -> Info {
        let fields = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect();
        Info { fields }
    }

    pub fn num(&self, field: &str) -> Option<f64> {
        self.fields.get(field)?.parse().ok()
    }

    /// Redis's own CPU seconds so far (user + system, every thread).
    pub fn cpu_s(&self) -> Option<f64> {
        Some(self.num("used_cpu_user")? + self.num("used_cpu_sys")?)
    }

    /// Calls per command (`cmdstat_publish:calls=12,usec=…` → publish: 12).
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.fields
            .iter()
            .filter_map(|(k, v)| {
                let cmd = k.strip_prefix("cmdstat_")?;
                let calls = v.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((cmd.to_owned(), calls.parse().ok()?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_and_command_calls() {
        let text = "# Stats\r\ntotal_commands_processed:1200\r\n# CPU\r\nused_cpu_sys:1.50\r\n\
                    used_cpu_user:2.25\r\n# Commandstats\r\n\
                    cmdstat_publish:calls=12,usec=40,usec_per_call=3.33,rejected_calls=0\r\n\
                    cmdstat_mget:calls=7,usec=9\r\n";
        let i = Info::parse(text);
        assert_eq!(i.num("total_commands_processed"), Some(1200.0));
        assert_eq!(i.cpu_s(), Some(3.75));
        let c = i.calls();
        assert_eq!((c["publish"], c["mget"]), (12, 7));
        assert_eq!(i.num("missing"), None);
    }
}
