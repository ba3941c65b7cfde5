//! `connections`: what an idle connected device costs the server.
//!
//! C accounts are registered, then each connects its WebSocket and waits for
//! `queue-empty` (the point at which a real client is "online"), and stays
//! connected, reading, so it answers the server's pings. Client sockets are
//! spread over source addresses 127.0.0.2, 127.0.0.3, … (`--per-source`
//! each) because one source address has only ~28,000 ephemeral ports toward
//! one server port.
//!
//! It reports the time to connect them all, handshake-to-queue-empty
//! latency, and the server's resident memory before and after (from
//! `/proc/<pid>/status`: the self-started child, or `--server-pid`), i.e.
//! the memory per idle connection.
//!
//! 50,000 connections need about 50,000 descriptors on each side: raise
//! `ulimit -n` (hard limit) before running; the tool raises its own soft
//! limit to the hard limit at start and a self-started server inherits it.
//! A server run by systemd needs `LimitNOFILE=` in its unit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, close_quietly, drain_until_queue_empty, Device};
use crate::server::Courier;
use crate::stats::{per_sec, round1, Latency, Progress, Report};

#[derive(clap::Args, Clone, Debug)]
pub struct ConnectionsArgs {
    /// Idle authenticated WebSockets to open.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Client sockets per source address (127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value_t = 20_000)]
    pub per_source: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds to hold all connections open after the last one is up.
    #[arg(long, default_value_t = 2.0)]
    pub hold_secs: f64,
}

/// The source address for connection `i`.
fn source(i: usize, per_source: usize) -> Option<IpAddr> {
    let n = 2 + i / per_source.max(1);
    (n <= 254).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n as u8)))
}

pub async fn run(server: &Courier, args: &ConnectionsArgs, quiet: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("connections");
    let c = args.count;
    if c == 0 || source(c - 1, args.per_source).is_none() {
        bail!("--count must be positive and fit 127.0.0.2..=127.0.0.254 at --per-source each");
    }
    if !(args.hold_secs.is_finite() && (0.0..=3600.0).contains(&args.hold_secs)) {
        bail!("--hold-secs must be in 0..=3600");
    }
    if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        if (c as u64) + 256 > soft {
            bail!(
                "{c} connections need ~{} descriptors but the limit is {soft}; raise `ulimit -n` (hard) first",
                c + 256
            );
        }
    }
    let base = server.base();
    let devices = {
        let progress = Progress::new("register", &["accounts"], 0);
        let _line = progress.report_every_second(quiet);
        client::register_many(&base, c, 64, Some(progress.counter(0))).await?
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.rss_kib();

    let progress = Progress::new("connect", &["online", "failed"], 0);
    let line = progress.report_every_second(quiet);
    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let outcomes: Vec<anyhow::Result<(Duration, tokio::task::JoinHandle<()>)>> =
        futures_util::stream::iter(devices.iter().enumerate())
            .map(|(i, d)| {
                let (progress, stop_rx, dropped) = (&progress, stop_rx.clone(), dropped.clone());
                async move {
                    let r = connect_and_hold(
                        server.addr,
                        d,
                        source(i, args.per_source),
                        stop_rx,
                        dropped,
                    )
                    .await;
                    progress.add(if r.is_ok() { 0 } else { 1 }, 1);
                    r
                }
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect()
            .await;
    let connect_time = start.elapsed();
    drop(line);

    let mut latency = Latency::new();
    let mut holders = Vec::new();
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    for o in outcomes {
        match o {
            Ok((l, h)) => {
                latency.record(l);
                holders.push(h);
            }
            Err(e) => *errors.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    let online = holders.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = server.rss_kib();
    tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
    let dropped_while_idle = dropped.load(Ordering::Relaxed);

    let close_start = Instant::now();
    let _ = stop_tx.send(true);
    for h in holders {
        let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
    }
    let close_time = close_start.elapsed();

    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if online > 0 => Some(a.saturating_sub(b) as f64 / online as f64),
        _ => None,
    };
    let sources = source(c - 1, args.per_source)
        .map(|ip| format!("127.0.0.2..={ip}"))
        .unwrap_or_default();
    report.row(
        "connections",
        format!("{online} of {c} online (sources {sources})"),
    );
    report.row(
        "connect all",
        format!(
            "{:.2} s ({:.0} connections/s, {} at once)",
            connect_time.as_secs_f64(),
            per_sec(online as u64, connect_time),
            args.concurrency
        ),
    );
    report.row("connect → queue-empty", latency.summary());
    let kib =
        |v: Option<u64>| v.map_or("n/a (pass --server-pid)".to_owned(), |k| format!("{k} KiB"));
    report.row("server RSS before", kib(rss_before));
    report.row("server RSS after", kib(rss_after));
    report.row(
        "RSS per connection",
        per_conn.map_or("n/a".to_owned(), |k| format!("{k:.1} KiB")),
    );
    report.row(
        "dropped while idle",
        format!("{dropped_while_idle} (held {} s)", args.hold_secs),
    );
    report.row("close all", format!("{:.2} s", close_time.as_secs_f64()));
    for (e, n) in errors.iter().take(3) {
        report.fail(format!("{n} connections failed: {e}"));
    }
    if dropped_while_idle > 0 {
        report.fail(format!(
            "{dropped_while_idle} idle connections were closed by the server"
        ));
    }
    report.fig("count", c);
    report.fig("online", online);
    report.fig("failed", c - online);
    report.fig("connect_s", connect_time.as_secs_f64());
    report.fig(
        "connections_per_s",
        round1(per_sec(online as u64, connect_time)),
    );
    report.fig("connect_latency", latency.json());
    report.fig("rss_before_kib", rss_before);
    report.fig("rss_after_kib", rss_after);
    report.fig("rss_per_connection_kib", per_conn.map(round1));
    report.fig("dropped_while_idle", dropped_while_idle);
    report.fig("close_s", close_time.as_secs_f64());
    Ok(report)
}

/// Connects from `source`, waits for queue-empty, then keeps reading (so
/// pings are answered) in a task until `stop`; a close before that counts
/// in `dropped`.
async fn connect_and_hold(
    addr: SocketAddr,
    device: &Device,
    source: Option<IpAddr>,
    mut stop: watch::Receiver<bool>,
    dropped: Arc<AtomicU64>,
) -> anyhow::Result<(Duration, tokio::task::JoinHandle<()>)> {
    let t0 = Instant::now();
    let fut = async {
        let mut ws = client::connect(addr, device, source).await?;
        drain_until_queue_empty(&mut ws, client::IO_TIMEOUT, None).await?;
        anyhow::Ok(ws)
    };
    let mut ws = tokio::time::timeout(client::IO_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "no queue-empty within {:?}",
                client::IO_TIMEOUT
            ))
        })?;
    let latency = t0.elapsed();
    let holder = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                m = ws.next() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
        close_quietly(ws).await;
    });
    Ok((latency, holder))
}
