//! The courier under test: either a `courier serve` child process the tool
//! starts (port 0 on 127.0.0.1, a fresh SQLite file in a temp dir unless a
//! PostgreSQL URL is given, rate limits off) and stops with SIGTERM at the
//! end, or an already running server named by `--server`.
//!
//! The child's stderr is kept (the last lines, and every WARN/ERROR line up
//! to a bound) so that server-side trouble shows up in the report.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

/// How to start a courier child.
pub struct StartOptions {
    /// The `courier` binary.
    pub bin: PathBuf,
    /// `postgres://…` of an EMPTY database, or `None` for a fresh SQLite file.
    pub database_url: Option<String>,
    /// `COURIER_WORKERS` (None: the server's default, one per core).
    pub workers: Option<usize>,
    /// Extra `KEY=VALUE` environment for the child, applied last.
    pub env: Vec<(String, String)>,
    /// `COURIER_MAX_ONE_TIME_KEYS` (bundles need many keys per device).
    pub max_one_time_keys: u64,
    /// `COURIER_MAILBOX_MAX_MESSAGES` (spill fills mailboxes).
    pub mailbox_max_messages: u64,
    /// Also write the server's whole stderr here.
    pub log_file: Option<PathBuf>,
}

/// Where the server's stderr goes.
#[derive(Default)]
struct LogTail {
    last: VecDeque<String>,
    warnings: u64,
    errors: u64,
    problems: Vec<String>,
}

const LOG_TAIL_LINES: usize = 40;
const LOG_PROBLEMS_KEPT: usize = 20;

impl LogTail {
    fn push(&mut self, line: String) {
        // env_logger: `[2026-01-01T00:00:00Z WARN  module] text`.
        let head = line.get(..40).unwrap_or(&line);
        let is_error = head.contains(" ERROR ");
        let is_warn = head.contains(" WARN ");
        // Expected at start when rate limits are off; not a finding.
        // Benchmarks run with the limits off, and each server makes its own
        // sealed-sender certificate set on its first start.
        let expected = line.contains("rate limit")
            || line.contains("RATE_LIMITS")
            || line.contains("made a sealed-sender certificate set");
        if is_error {
            self.errors += 1;
        }
        if is_warn && !expected {
            self.warnings += 1;
        }
        if (is_error || (is_warn && !expected)) && self.problems.len() < LOG_PROBLEMS_KEPT {
            self.problems.push(line.clone());
        }
        if self.last.len() == LOG_TAIL_LINES {
            self.last.pop_front();
        }
        self.last.push_back(line);
    }
}

struct Spawned {
    child: Child,
    log: Arc<Mutex<LogTail>>,
    /// Holds the SQLite file; deleted when the server is dropped.
    _dir: Option<tempfile::TempDir>,
    /// The server's sealed-sender certificate set, made on its first start.
    _certificates: tempfile::TempDir,
}

/// A courier to drive.
pub struct Courier {
    pub addr: SocketAddr,
    pid: Option<u32>,
    child: Option<Spawned>,
}

/// What the server said and did, for the report.
pub struct ServerSummary {
    pub exit: Option<String>,
    pub warnings: u64,
    pub errors: u64,
    pub problems: Vec<String>,
}

impl Courier {
    /// An already running server at `url` (`http://127.x.y.z:PORT`).
    /// Only 127.0.0.0/8 is accepted: this tool floods what it targets.
    pub fn external(url: &str, pid: Option<u32>) -> anyhow::Result<Courier> {
        Ok(Courier {
            addr: loopback_addr(url)?,
            pid,
            child: None,
        })
    }

    /// Starts `courier serve` and waits until it answers `/readyz`.
    pub async fn start(opts: StartOptions) -> anyhow::Result<Courier> {
        if !opts.bin.is_file() {
            bail!(
                "no courier binary at {} (run `cargo build --release` at the repository root, \
                 or pass --courier-bin)",
                opts.bin.display()
            );
        }
        let (dir, database_url) = match &opts.database_url {
            Some(url) => (None, url.clone()),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("courier-load-")
                    .tempdir()
                    .context("temp dir for the SQLite file")?;
                let path = dir.path().join("courier.db").to_string_lossy().into_owned();
                (Some(dir), path)
            }
        };
        let certificates = tempfile::Builder::new()
            .prefix("courier-load-certificates-")
            .tempdir()
            .context("temp dir for the certificate set")?;
        let mut cmd = Command::new(&opts.bin);
        cmd.arg("serve")
            .env("COURIER_CERTIFICATES_DIR", certificates.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("COURIER_BIND", "127.0.0.1:0")
            .env("COURIER_DATABASE_URL", &database_url)
            .env("COURIER_RATE_LIMITS", "off")
            .env(
                "COURIER_MAX_ONE_TIME_KEYS",
                opts.max_one_time_keys.to_string(),
            )
            .env(
                "COURIER_MAILBOX_MAX_MESSAGES",
                opts.mailbox_max_messages.to_string(),
            )
            .env_remove("COURIER_CONFIG")
            // The test suite's variable, not a server setting (the server would warn).
            .env_remove("COURIER_TEST_POSTGRES_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(w) = opts.workers {
            cmd.env("COURIER_WORKERS", w.to_string());
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", opts.bin.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().context("child stderr")?;
        let log = Arc::new(Mutex::new(LogTail::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let mut copy = match &opts.log_file {
            Some(p) => {
                Some(std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?)
            }
            None => None,
        };
        std::thread::Builder::new()
            .name("courier-stderr".into())
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(f) = &mut copy {
                        use std::io::Write as _;
                        let _ = writeln!(f, "{line}");
                    }
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        if let (Some(tx), Ok(addr)) = (tx.take(), rest.trim().parse::<SocketAddr>())
                        {
                            let _ = tx.send(addr);
                        }
                    }
                    if let Ok(mut l) = sink.lock() {
                        l.push(line);
                    }
                }
            })
            .context("stderr reader thread")?;
        let mut me = Courier {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            pid: Some(pid),
            child: Some(Spawned {
                child,
                log,
                _dir: dir,
                _certificates: certificates,
            }),
        };
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .context("join")?;
        match addr {
            Ok(addr) => me.addr = addr,
            Err(_) => bail!("courier did not log its address:\n{}", me.log_tail()),
        }
        me.wait_ready().await?;
        Ok(me)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = crate::client::http_client();
        let url = format!("{}/readyz", self.base());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.child.try_wait() {
                    bail!("courier exited ({status}) at start:\n{}", self.log_tail());
                }
            }
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("courier never became ready:\n{}", self.log_tail())
    }

    /// `http://ADDR`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Resident set size of the server process in KiB (`VmRSS`), if known.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib_of(self.pid?)
    }

    /// Samples the server's RSS every `every` until [`RssSampler::stop`];
    /// `None` when its pid is unknown (external server without `--server-pid`).
    pub fn rss_sampler(&self, every: Duration) -> Option<RssSampler> {
        let pid = self.pid?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut peak = RssPeak::default();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                if let Some(kib) = rss_kib_of(pid) {
                    peak.samples += 1;
                    peak.max_kib = peak.max_kib.max(kib);
                    peak.last_kib = kib;
                }
            }
            // One last sample, so a short phase is never unmeasured.
            if let Some(kib) = rss_kib_of(pid) {
                peak.samples += 1;
                peak.max_kib = peak.max_kib.max(kib);
                peak.last_kib = kib;
            }
            peak
        });
        Some(RssSampler { stop, task })
    }

    /// Whether a self-started server has exited (crashed) already.
    pub fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    fn log_tail(&self) -> String {
        self.child
            .as_ref()
            .and_then(|c| {
                c.log
                    .lock()
                    .ok()
                    .map(|l| l.last.iter().cloned().collect::<Vec<_>>())
            })
            .unwrap_or_default()
            .join("\n")
    }

    /// Stops a self-started server the way an operator would (SIGTERM, which
    /// drains gracefully), waiting up to 30 s before SIGKILL, and sums up its
    /// log. An external server is left running.
    pub async fn stop(&mut self) -> ServerSummary {
        let Some(mut c) = self.child.take() else {
            return ServerSummary {
                exit: None,
                warnings: 0,
                errors: 0,
                problems: Vec::new(),
            };
        };
        let pid = c.child.id().to_string();
        let mut exit = None;
        if let Ok(Some(status)) = c.child.try_wait() {
            exit = Some(format!("had already exited: {status}"));
        } else if Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success())
        {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = c.child.try_wait() {
                    exit = Some(status.to_string());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if exit.is_none() {
            let _ = c.child.kill();
            let _ = c.child.wait();
            exit = Some("did not exit within 30 s of SIGTERM; killed".into());
        }
        // Let the reader thread see the last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (warnings, errors, problems) = c
            .log
            .lock()
            .map(|l| (l.warnings, l.errors, l.problems.clone()))
            .unwrap_or_default();
        ServerSummary {
            exit,
            warnings,
            errors,
            problems,
        }
    }
}

impl Drop for Courier {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }
}

/// `VmRSS` of process `pid` in KiB, from `/proc/PID/status`.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// What an [`RssSampler`] saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct RssPeak {
    pub max_kib: u64,
    pub last_kib: u64,
    pub samples: u64,
}

/// A task sampling the server's RSS at a fixed interval (see
/// [`Courier::rss_sampler`]).
pub struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<RssPeak>,
}

impl RssSampler {
    /// Stops sampling; the peak and the last sample.
    pub async fn stop(self) -> RssPeak {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// `http://127.0.0.1:8080[/…]` or `localhost:8080` → a 127.0.0.0/8 address.
pub fn loopback_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("ws://"))
        .unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = match authority.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => authority.to_owned(),
    };
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| anyhow!("--server {url:?}: expected http://127.x.y.z:PORT"))?;
    match addr.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => Ok(addr),
        _ => bail!("--server {url:?}: only 127.0.0.0/8 targets are allowed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert_eq!(loopback_addr("http://127.0.0.1:8080").unwrap().port(), 8080);
        assert!(loopback_addr("http://127.1.2.3:80/").is_ok());
        assert!(loopback_addr("localhost:9000").is_ok());
        assert!(loopback_addr("http://10.0.0.1:8080").is_err());
        assert!(loopback_addr("http://example.com:8080").is_err());
    }

    #[test]
    fn log_tail_counts_problems() {
        let mut l = LogTail::default();
        l.push("[2026-01-01T00:00:00Z INFO  courier] listening on 127.0.0.1:1".into());
        l.push("[2026-01-01T00:00:00Z WARN  courier] rate limits are off".into());
        l.push("[2026-01-01T00:00:00Z ERROR courier::x] boom".into());
        assert_eq!((l.warnings, l.errors, l.problems.len()), (0, 1, 1));
    }
}
