//! `cluster-relay`: live relay across the nodes of a cluster (issue 12),
//! against relay within one node of the same cluster, in one run.
//!
//! The tool starts `--nodes` courier processes (default 2) on one fresh
//! PostgreSQL database and one Redis, under a cluster name of this run's
//! own (so runs sharing a Redis do not see each other's presence). Then,
//! with the relay scenario's clients and options (`relay`'s `--pairs`,
//! `--rate`, `--sweep`, …):
//!
//! 1. **single-node**: senders and receivers all on node 1 (the others idle);
//! 2. **cross-node**: senders on node 1, receivers spread over nodes 2..N,
//!    so every copy is located in Redis, forwarded over pub/sub, pushed by
//!    the other node, and its ack confirmed back before node 1 answers.
//!
//! Each phase is a sweep (max rate with delivery p99 < `--p99-ms`, nothing
//! lost, and at least `--min-delivered-pct` of the sends answered
//! `delivered` rather than `queued`), followed by a fixed run at half that
//! rate (`--half-rate-secs`), or one fixed-rate run without `--sweep`.
//! Per phase it reports server CPU per message summed over every node, the
//! nodes' cluster counters from `/metrics` (forwards, confirmations,
//! fallback spills, bus errors), and what Redis did per message (`INFO`:
//! commands, CPU, calls per command), and at the end the cross-node /
//! single-node ratios and the presence keys the nodes left behind.

mod nodes;
pub mod redis;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::bail;
use serde_json::{json, Value};

use crate::relay::{self, Brief, Outcome, RelayArgs, Target};
use crate::server::{Courier, ServerSummary, StartOptions};
use crate::stats::{round1, round3, Report};
use nodes::{Counters, Database};
use redis::{Info, Redis};

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Runs of this process (the smoke and a scenario may both start clusters):
/// part of the database and cluster names.
static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(1);

#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub relay: RelayArgs,
    /// Courier nodes to start: senders on node 1, receivers spread over the others.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// The Redis every node uses (COURIER_REDIS_URL).
    #[arg(long, default_value = DEFAULT_REDIS_URL)]
    pub redis_url: String,
    /// A PostgreSQL server to create this run's database on (and drop it
    /// after), given as a URL of any database there; ignored with
    /// --database-url, which names an EMPTY database to use instead.
    #[arg(long, default_value = DEFAULT_POSTGRES_URL)]
    pub postgres_url: String,
    /// COURIER_CLUSTER_NAME [default: `load<pid>x<n>`, unique per run].
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Percentage of a sweep step's sends that must be answered `delivered`
    /// (not `queued`) for the step to pass.
    #[arg(long, default_value_t = 99.0)]
    pub min_delivered_pct: f64,
    /// Seconds of the fixed run at half each sweep's max rate (0: none).
    #[arg(long, default_value_t = 5.0)]
    pub half_rate_secs: f64,
}

impl ClusterArgs {
    /// The smoke's size: a few seconds, correctness and live delivery only.
    pub fn smoke(redis_url: String, postgres_url: String) -> ClusterArgs {
        ClusterArgs {
            relay: RelayArgs {
                pairs: 4,
                rate: 500.0,
                duration: 2.0,
                size: 256,
                sweep: false,
                step_secs: 3.0,
                start_rate: 1000.0,
                max_rate: 1000.0,
                bisect_steps: 0,
                confirm: 0,
                p99_ms: 10.0,
                grace_secs: 10.0,
                // Correctness only: every message's latency is shown.
                warmup_secs: 0.0,
                min_delivered: 0.0,
                in_flight: None,
            },
            nodes: 2,
            redis_url,
            postgres_url,
            cluster_name: None,
            min_delivered_pct: 99.0,
            half_rate_secs: 0.0,
        }
    }
}

/// How to start each node (the global "Server under test" options).
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub bin: PathBuf,
    pub workers: Option<usize>,
    /// `--server-env`, applied after the cluster's own variables.
    pub env: Vec<(String, String)>,
    /// `--server-log FILE`: node i writes `FILE.node<i>`.
    pub log_file: Option<PathBuf>,
    /// `--database-url`: an EMPTY database to use instead of a fresh one.
    pub database_url: Option<String>,
}

/// Starts the cluster, measures, stops it; the report and the nodes' log
/// summary (merged).
pub async fn run(
    opts: &NodeOptions,
    args: &ClusterArgs,
    quiet: bool,
) -> (anyhow::Result<Vec<Report>>, Option<ServerSummary>) {
    if let Err(e) = validate(args) {
        return (Err(e), None);
    }
    let seq = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let name = args
        .cluster_name
        .clone()
        .unwrap_or_else(|| format!("load{pid}x{seq}"));
    // Dropped (with the database) on every path out of here.
    let (_db, database_url) = match &opts.database_url {
        Some(url) => (None, url.clone()),
        None => match Database::create(&args.postgres_url, &format!("courier_load_{pid}_{seq}")) {
            Ok(db) => {
                let url = db.url.clone();
                (Some(db), url)
            }
            Err(e) => return (Err(e.context("create the run's PostgreSQL database")), None),
        },
    };
    // Cluster nodes never make their own sealed-sender certificates: one
    // set for all of them, as an operator would deploy it.
    let certificates = match shared_certificates(&opts.bin) {
        Ok(dir) => dir,
        Err(e) => return (Err(e), None),
    };
    let mut nodes: Vec<Courier> = Vec::new();
    // One at a time: the first migrates the empty database.
    for i in 1..=args.nodes {
        let mut env = vec![
            ("COURIER_REDIS_URL".to_owned(), args.redis_url.clone()),
            ("COURIER_CLUSTER_NAME".to_owned(), name.clone()),
            (
                "COURIER_CERTIFICATES_DIR".to_owned(),
                certificates
                    .path()
                    .join("set")
                    .to_string_lossy()
                    .into_owned(),
            ),
        ];
        env.extend(opts.env.iter().cloned());
        let started = Courier::start(StartOptions {
            bin: opts.bin.clone(),
            database_url: Some(database_url.clone()),
            workers: opts.workers,
            env,
            max_one_time_keys: 100_000,
            mailbox_max_messages: 1_000_000,
            log_file: opts
                .log_file
                .as_ref()
                .map(|f| PathBuf::from(format!("{}.node{i}", f.display()))),
        })
        .await;
        match started {
            Ok(c) => {
                if !quiet {
                    eprintln!(
                        "courier-load: started node {i} (pid {}) on {}, cluster {name}",
                        c.pid().unwrap_or(0),
                        c.addr
                    );
                }
                nodes.push(c);
            }
            Err(e) => {
                for n in &mut nodes {
                    n.stop().await;
                }
                return (Err(e.context(format!("start node {i}"))), None);
            }
        }
    }

    let mut result = measure(&nodes, args, &name, quiet).await;
    let mut crashed = Vec::new();
    for (i, n) in nodes.iter_mut().enumerate() {
        if let Some(status) = n.exited() {
            crashed.push(format!("node {} exited during the run: {status}", i + 1));
        }
    }
    let mut summary = ServerSummary {
        exit: Some("exit status: 0".into()),
        warnings: 0,
        errors: 0,
        problems: Vec::new(),
    };
    for (i, n) in nodes.iter_mut().enumerate() {
        let s = n.stop().await;
        if s.exit.as_deref() != Some("exit status: 0") {
            summary.exit = Some(format!("node {}: {}", i + 1, s.exit.unwrap_or_default()));
        }
        summary.warnings += s.warnings;
        summary.errors += s.errors;
        summary.problems.extend(
            s.problems
                .into_iter()
                .map(|p| format!("node {}: {p}", i + 1)),
        );
    }
    // A node releases a device's presence when its connection ends; what
    // is still there after every node stopped would stay in Redis forever
    // (presence has no expiry).
    let left = match Redis::connect(&args.redis_url).await {
        Ok(mut r) => r.count_keys(&format!("{name}:at:*")).await.ok(),
        Err(_) => None,
    };
    if let Ok(reports) = &mut result {
        if let Some(r) = reports.last_mut() {
            for c in crashed {
                r.fail(c);
            }
            r.row(
                "presence keys left",
                left.map_or("n/a (Redis not readable)".into(), |n| {
                    format!("{n} under {name}:at:* after every node stopped")
                }),
            );
            r.fig("presence_keys_left", left);
            if left.is_some_and(|n| n > 0) {
                r.warn(format!(
                    "{} presence keys left in Redis after the nodes stopped",
                    left.unwrap_or(0)
                ));
            }
        }
    }
    (result, Some(summary))
}

fn validate(args: &ClusterArgs) -> anyhow::Result<()> {
    if !(2..=16).contains(&args.nodes) {
        bail!("--nodes must be in 2..=16");
    }
    if !(0.0..=100.0).contains(&args.min_delivered_pct) {
        bail!("--min-delivered-pct must be in 0..=100");
    }
    if !(0.0..=600.0).contains(&args.half_rate_secs) {
        bail!("--half-rate-secs must be in 0..=600");
    }
    if let Some(n) = &args.cluster_name {
        let ok = (1..=64).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            bail!("--cluster-name must be 1–64 of [A-Za-z0-9_-]");
        }
    }
    Ok(())
}

/// What Redis did over a phase.
#[derive(Debug, Default)]
struct RedisUse {
    commands: f64,
    cpu_s: f64,
    calls: Vec<(String, u64)>,
}

impl RedisUse {
    fn between(before: &Info, after: &Info) -> RedisUse {
        let d = |f: &str| after.num(f).unwrap_or(0.0) - before.num(f).unwrap_or(0.0);
        let was = before.calls();
        let mut calls: Vec<(String, u64)> = after
            .calls()
            .into_iter()
            .map(|(cmd, n)| {
                let n = n.saturating_sub(was.get(&cmd).copied().unwrap_or(0));
                (cmd, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        calls.sort_by_key(|c| std::cmp::Reverse(c.1));
        RedisUse {
            // Less the INFO that read `after` (counted once it completed).
            commands: (d("total_commands_processed") - 1.0).max(0.0),
            cpu_s: after.cpu_s().unwrap_or(0.0) - before.cpu_s().unwrap_or(0.0),
            calls,
        }
    }

    fn json(&self, messages: u64) -> Value {
        let per = |x: f64| (messages > 0).then(|| round3(x / messages as f64));
        json!({
            "commands": self.commands,
            "commands_per_msg": per(self.commands),
            "cpu_s": round3(self.cpu_s),
            "cpu_us_per_msg": per(self.cpu_s * 1e6).map(round1),
            "calls": self.calls.iter().map(|(c, n)| (c.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        })
    }

    fn summary(&self, messages: u64) -> String {
        if messages == 0 {
            return "no message answered".into();
        }
        let m = messages as f64;
        let top: Vec<String> = self
            .calls
            .iter()
            .take(5)
            .map(|(c, n)| format!("{c} {:.3}", *n as f64 / m))
            .collect();
        format!(
            "{:.2} commands/msg, {:.1} µs CPU/msg ({} messages; per msg: {})",
            self.commands / m,
            self.cpu_s * 1e6 / m,
            messages,
            top.join(", ")
        )
    }
}

/// One topology's figures.
struct Phase {
    outcome: Outcome,
    half: Option<Brief>,
    /// Sends answered 200 in the phase (sweep and half-rate run).
    messages: u64,
    counters: Counters,
    per_node: Vec<Counters>,
    redis: Option<RedisUse>,
}

async fn measure(
    nodes: &[Courier],
    args: &ClusterArgs,
    name: &str,
    quiet: bool,
) -> anyhow::Result<Vec<Report>> {
    let mut report = Report::new("cluster-relay");
    let mut redis = match Redis::connect(&args.redis_url).await {
        Ok(r) => Some(r),
        Err(e) => {
            report.warn(format!("Redis INFO not readable, no Redis figures: {e:#}"));
            None
        }
    };
    report.row(
        "cluster",
        format!(
            "{} nodes (pids {}), cluster name {name}, Redis {}",
            nodes.len(),
            nodes
                .iter()
                .map(|n| n.pid().unwrap_or(0).to_string())
                .collect::<Vec<_>>()
                .join(", "),
            args.redis_url
        ),
    );
    let single = Target {
        name: "single-node",
        extra_pids: nodes[1..].iter().filter_map(Courier::pid).collect(),
        ..Target::courier(&nodes[0])
    };
    let cross = Target {
        name: "cross-node",
        receiver_addrs: nodes[1..].iter().map(|n| n.addr).collect(),
        ..single.clone()
    };
    let relay_args = RelayArgs {
        min_delivered: args.min_delivered_pct / 100.0,
        ..args.relay.clone()
    };
    let s = phase(
        nodes,
        &single,
        "single-node, half rate",
        &relay_args,
        args,
        &mut redis,
        quiet,
        &mut report,
    )
    .await?;
    let c = phase(
        nodes,
        &cross,
        "cross-node, half rate",
        &relay_args,
        args,
        &mut redis,
        quiet,
        &mut report,
    )
    .await?;
    compare(&s, &c, args, &mut report);
    Ok(vec![report])
}

#[allow(clippy::too_many_arguments)]
async fn phase(
    nodes: &[Courier],
    target: &Target,
    half_name: &'static str,
    relay_args: &RelayArgs,
    args: &ClusterArgs,
    redis: &mut Option<Redis>,
    quiet: bool,
    report: &mut Report,
) -> anyhow::Result<Phase> {
    let http = crate::client::http_client();
    let read_counters = || async {
        let mut v = Vec::new();
        for n in nodes {
            v.push(nodes::counters(&http, &n.base()).await?);
        }
        anyhow::Ok(v)
    };
    let before = read_counters().await?;
    let info_before = match redis {
        Some(r) => Some(r.info().await?),
        None => None,
    };
    let outcome = relay::run(target, relay_args, quiet, report).await?;
    let mut messages = outcome.answered_ok;
    let mut half = None;
    if let (true, Some(best)) = (relay_args.sweep && args.half_rate_secs > 0.0, outcome.best) {
        let half_args = RelayArgs {
            sweep: false,
            rate: (best / 2.0).round().max(1.0),
            duration: args.half_rate_secs,
            ..relay_args.clone()
        };
        let half_target = Target {
            name: half_name,
            ..target.clone()
        };
        let o = relay::run(&half_target, &half_args, quiet, report).await?;
        messages += o.answered_ok;
        half = o.best_step;
    }
    let after = read_counters().await?;
    let per_node: Vec<Counters> = after.iter().zip(&before).map(|(a, b)| a.minus(b)).collect();
    let counters = per_node.iter().fold(Counters::default(), |s, c| s.plus(c));
    let redis_use = match (redis, info_before) {
        (Some(r), Some(b)) => Some(RedisUse::between(&b, &r.info().await?)),
        _ => None,
    };
    Ok(Phase {
        outcome,
        half,
        messages,
        counters,
        per_node,
        redis: redis_use,
    })
}

fn brief_text(b: Option<&Brief>) -> String {
    match b {
        Some(b) => format!(
            "{:.0} msg/s offered, {:.0} delivered/s, delivery p50 {:.2} / p99 {:.2} ms, \
             {:.2} % answered delivered, server CPU {} (all nodes)",
            b.rate,
            b.delivered_rate,
            b.p50_ms,
            b.p99_ms,
            b.delivered_share * 100.0,
            b.cpu_us_per_msg
                .map_or("n/a".into(), |us| format!("{us:.1} µs/msg"))
        ),
        None => "n/a".into(),
    }
}

fn brief_json(b: Option<&Brief>) -> Value {
    b.map_or(Value::Null, |b| {
        json!({
            "rate": b.rate,
            "delivered_rate": round1(b.delivered_rate),
            "p50_ms": round3(b.p50_ms),
            "p99_ms": round3(b.p99_ms),
            "delivered_share": round3(b.delivered_share),
            "cpu_us_per_msg": b.cpu_us_per_msg.map(round1),
        })
    })
}

fn compare(s: &Phase, c: &Phase, args: &ClusterArgs, report: &mut Report) {
    let sweep = args.relay.sweep;
    for (label, p) in [("single-node", s), ("cross-node", c)] {
        let head = if sweep { "at max rate" } else { "fixed rate" };
        report.row(
            &format!("{label} {head}"),
            brief_text(p.outcome.best_step.as_ref()),
        );
        if sweep && args.half_rate_secs > 0.0 {
            report.row(&format!("{label} at half"), brief_text(p.half.as_ref()));
        }
        report.row(
            &format!("{label} cluster counters"),
            format!(
                "forwards {}, confirmations {}, fallback spills {}, bus errors {} (all nodes, whole phase)",
                p.counters.forwards, p.counters.confirmations, p.counters.fallback_spills, p.counters.bus_errors
            ),
        );
        report.row(
            &format!("{label} Redis"),
            p.redis
                .as_ref()
                .map_or("n/a".into(), |r| r.summary(p.messages)),
        );
        report.fig(
            &format!("{}_summary", label.replace('-', "_")),
            json!({
                "max_rate": p.outcome.best,
                "at_max_rate": brief_json(p.outcome.best_step.as_ref()),
                "half_rate": brief_json(p.half.as_ref()),
                "messages": p.messages,
                "cluster_counters": p.counters.json(),
                "cluster_counters_per_node": p.per_node.iter().map(Counters::json).collect::<Vec<_>>(),
                "redis": p.redis.as_ref().map(|r| r.json(p.messages)),
            }),
        );
    }

    let ratio = match (s.outcome.best, c.outcome.best) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    if sweep {
        report.row(
            "cross / single max rate",
            ratio.map_or("n/a".into(), |r| {
                format!("{:.1} % (target ≥ 25 %)", r * 100.0)
            }),
        );
    }
    report.fig("ratio_cross_to_single", ratio.map(round3));
    // CPU at the highest offered rate both phases passed: the same load.
    let same = c
        .outcome
        .cpu_by_rate
        .iter()
        .filter_map(|&(rate, cu)| Some((rate, s.outcome.cpu_at(rate)?, cu)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    report.row(
        "server CPU cross / single",
        match same {
            Some((rate, su, cu)) if su > 0.0 => format!(
                "{:.2} × at {rate:.0} msg/s ({cu:.1} vs {su:.1} µs/msg, all nodes)",
                cu / su
            ),
            _ => "n/a".into(),
        },
    );
    report.fig(
        "cpu_cross_to_single",
        same.map(|(rate, su, cu)| {
            json!({"rate": rate, "single_us_per_msg": round1(su), "cross_us_per_msg": round1(cu),
                   "ratio": (su > 0.0).then(|| round3(cu / su))})
        }),
    );

    // Cross-node live delivery is the point: a fixed run that fell short of
    // the share is reported (the sweep already excludes such steps).
    let min = args.min_delivered_pct / 100.0;
    if let Some(b) = &c.outcome.best_step {
        if b.delivered_share < min {
            report.fail(format!(
                "cross-node: {:.2} % of sends answered delivered (< {} %)",
                b.delivered_share * 100.0,
                args.min_delivered_pct
            ));
        }
    }
    if c.outcome.best_step.is_none() {
        report.warn("cross-node: no run passed");
    }
    // Every cross-node copy passes the bus; a spill means a confirmation
    // came too late or the bus failed under this load.
    for (label, p) in [("single-node", s), ("cross-node", c)] {
        if p.counters.fallback_spills > 0.0 || p.counters.bus_errors > 0.0 {
            report.warn(format!(
                "{label}: {} fallback spills, {} bus errors",
                p.counters.fallback_spills, p.counters.bus_errors
            ));
        }
    }
}

/// Whether the cluster smoke can run here: a PostgreSQL it may create a
/// database on, and a Redis (`COURIER_TEST_POSTGRES_URL` and
/// `COURIER_TEST_REDIS_URL` as CI sets them, else the defaults); the URLs,
/// or why not.
pub async fn available() -> Result<(String, String), String> {
    let pg = std::env::var("COURIER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
    let redis_url =
        std::env::var("COURIER_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned());
    let probe = async {
        let mut r = Redis::connect(&redis_url).await?;
        r.ping().await
    };
    if let Err(e) = probe.await {
        return Err(format!("no Redis at {redis_url} ({e:#})"));
    }
    let pg_probe = pg.clone();
    match tokio::task::spawn_blocking(move || nodes::psql(&pg_probe, "SELECT 1")).await {
        Ok(Ok(())) => Ok((redis_url, pg)),
        Ok(Err(e)) => Err(format!("no PostgreSQL at {pg} ({e:#})")),
        Err(e) => Err(format!("PostgreSQL probe: {e}")),
    }
}

/// The smoke's cluster part: two nodes, 4 pairs × 500 msg/s × 2 s each way;
/// skipped (and passing) when PostgreSQL or Redis is not there.
pub async fn smoke(opts: &NodeOptions, quiet: bool) -> Report {
    let (redis_url, pg) = match available().await {
        Ok(urls) => urls,
        Err(why) => {
            let mut r = Report::new("cluster-relay");
            r.row("skipped", why);
            r.fig("skipped", true);
            return r;
        }
    };
    let args = ClusterArgs::smoke(redis_url, pg);
    // Always a fresh database: --database-url is the main server's.
    let opts = NodeOptions {
        database_url: None,
        log_file: None,
        ..opts.clone()
    };
    let (result, summary) = run(&opts, &args, quiet).await;
    let mut report = match result {
        Ok(mut reports) => reports
            .pop()
            .unwrap_or_else(|| Report::new("cluster-relay")),
        Err(e) => {
            let mut r = Report::new("cluster-relay");
            r.fail(format!("could not run: {e:#}"));
            r
        }
    };
    if let Some(s) = summary {
        if s.errors > 0 {
            report.warn(format!(
                "the nodes logged {} errors and {} warnings (first: {:?})",
                s.errors,
                s.warnings,
                s.problems.first()
            ));
        }
    }
    report
}

/// A fresh certificate set made by `courier certificates generate`, in a temp
/// dir that lives as long as the returned handle.
fn shared_certificates(bin: &std::path::Path) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("courier-load-cluster-certificates-")
        .tempdir()?;
    let out = std::process::Command::new(bin)
        .args(["certificates", "generate", "--out"])
        .arg(dir.path().join("set"))
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "courier certificates generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir)
}
