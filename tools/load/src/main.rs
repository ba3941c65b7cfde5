//! `courier-load`: load and benchmark scenarios for courier, driving a
//! `courier serve` process over HTTP and WebSocket exactly as clients do.
//!
//! Without `--server` it starts its own courier (the `courier` binary next
//! to its own executable, i.e. `target/release/courier`, or
//! `--courier-bin`) on 127.0.0.1:0 with a fresh SQLite file in a temp dir
//! — or `--database-url postgres://…`, which must name an EMPTY database
//! the tool may fill — with rate limits off, and stops it with SIGTERM at
//! the end. With `--server http://127.0.0.1:PORT` it drives that server
//! (rate limits must be off there; `--server-pid` lets the scenarios that
//! report server memory read it). Only 127.0.0.0/8 targets are accepted.
//!
//! Output: a progress line per second on stderr, a table per scenario on
//! stdout, and a last line `RESULT {json}` with every figure. Exit status 0
//! when every correctness check passed, 1 when one failed, 2 when the run
//! could not be carried out.

mod bundles;
mod ceiling;
mod client;
mod cluster;
mod connections;
mod cpu;
mod flood;
mod relay;
mod server;
mod smoke;
mod soak;
mod spill;
mod stalled;
mod stats;
mod unacked;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use crate::relay::{RelayArgs, Target};
use crate::server::{Courier, ServerSummary, StartOptions};
use crate::stats::Report;

#[derive(Parser)]
#[command(
    name = "courier-load",
    version,
    about = "Load and benchmark scenarios for courier (drives a courier process over the network)"
)]
struct Cli {
    /// Drive this running courier (http://127.x.y.z:PORT) instead of starting one.
    #[arg(long, global = true, help_heading = "Server under test")]
    server: Option<String>,
    /// The external server's pid, for its memory figures (`connections`, `soak`,
    /// `stalled`, `unacked-replay`) and its CPU per message (`relay`).
    #[arg(long, global = true, help_heading = "Server under test")]
    server_pid: Option<u32>,
    /// The courier binary to start [default: `courier` next to this executable].
    #[arg(long, global = true, help_heading = "Server under test")]
    courier_bin: Option<PathBuf>,
    /// PostgreSQL URL of an EMPTY database for the self-started server
    /// [default: a fresh SQLite file in a temp dir].
    #[arg(long, global = true, help_heading = "Server under test")]
    database_url: Option<String>,
    /// COURIER_WORKERS for the self-started server [default: one per core].
    #[arg(long, global = true, help_heading = "Server under test")]
    workers: Option<usize>,
    /// Extra KEY=VALUE environment for the self-started server (repeatable),
    /// e.g. --server-env COURIER_DB_POOL_SIZE=4.
    #[arg(long = "server-env", global = true, value_parser = parse_key_value, help_heading = "Server under test")]
    server_env: Vec<(String, String)>,
    /// Copy the self-started server's log (stderr) to this file.
    #[arg(long, global = true, help_heading = "Server under test")]
    server_log: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Live relay between connected pairs at a fixed offered rate (or --sweep).
    Relay {
        #[command(flatten)]
        args: RelayArgs,
        /// Also sweep the bare relay (the tool's child process) and report
        /// courier's max rate as a fraction of its, and courier's server CPU
        /// per message as a multiple of its (implies --sweep).
        #[arg(long)]
        with_ceiling: bool,
        /// Worker threads of the bare relay [default: one per core].
        #[arg(long)]
        ceiling_threads: Option<usize>,
        /// With --with-ceiling and --in-flight: how many times the
        /// half-rate latency runs (courier, then the bare relay at the same
        /// rate, in turn); the report gives each run and the median.
        #[arg(long, default_value_t = 1)]
        half_runs: usize,
    },
    /// Mailbox commits with offline recipients, then the drain.
    Spill(spill::SpillArgs),
    /// Steady relay with connection churn for a set time; server memory must stay flat.
    Soak(soak::SoakArgs),
    /// Ordinary users' latency while others flood sends and oversize messages (rate limits on).
    Flood(flood::FloodArgs),
    /// Prekey bundle fetches; fails if a one-time key is handed out twice.
    Bundles(bundles::BundlesArgs),
    /// Idle authenticated WebSockets: connect time and server RSS per connection.
    Connections(connections::ConnectionsArgs),
    /// A receiver that stops reading: its senders still answered `queued`, a
    /// new connection replaces it at once.
    Stalled(stalled::StalledArgs),
    /// A large mailbox read without acks: the replay pauses, server memory stays bounded.
    UnackedReplay(unacked::UnackedArgs),
    /// The relay client against a bare WebSocket relay (the tool's child process, no courier).
    Ceiling {
        #[command(flatten)]
        args: RelayArgs,
        /// Worker threads of the bare relay [default: one per core].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Relay across the nodes of a cluster (senders on node 1, receivers on
    /// the others) against relay within node 1, in one run: N nodes on one
    /// fresh PostgreSQL database and one Redis.
    ClusterRelay(cluster::ClusterArgs),
    /// Every scenario at a small size, checking correctness only (for CI).
    Smoke {
        #[arg(long, default_value = bundles::DEFAULT_VECTORS)]
        vectors: PathBuf,
    },
    /// Internal: the bare relay's own process, started by `ceiling` and
    /// `relay --with-ceiling` (it prints its address, exits when stdin closes).
    #[command(name = ceiling::SUBCOMMAND, hide = true)]
    CeilingServe {
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Scenario::CeilingServe { threads } = cli.scenario {
        // The tool's own child (see `ceiling`): it serves as many
        // connections as the relay clients open.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        return match ceiling::serve_child(threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("courier-load {}: {e:#}", ceiling::SUBCOMMAND);
                ExitCode::from(2)
            }
        };
    }
    // Every socket is a descriptor; the child server inherits the raised limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if !cli.quiet => eprintln!("courier-load: file descriptor limit {n}"),
        Ok(_) => {}
        Err(e) => eprintln!("courier-load: cannot raise the file descriptor limit: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("courier-load: cannot start a runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let name = scenario_name(&cli.scenario);
    let (result, summary) = runtime.block_on(run(cli));
    match result {
        Ok(reports) => finish(name, reports, summary),
        Err(e) => {
            eprintln!("courier-load: {e:#}");
            let mut j = json!({"scenario": name, "ok": false, "error": format!("{e:#}")});
            if let Some(s) = &summary {
                j["server"] = server_json(s);
            }
            println!("RESULT {j}");
            ExitCode::from(2)
        }
    }
}

fn scenario_name(s: &Scenario) -> &'static str {
    match s {
        Scenario::Relay { .. } => "relay",
        Scenario::Spill(_) => "spill",
        Scenario::Soak(_) => "soak",
        Scenario::Flood(_) => "flood",
        Scenario::Bundles(_) => "bundles",
        Scenario::Connections(_) => "connections",
        Scenario::Stalled(_) => "stalled",
        Scenario::UnackedReplay(_) => "unacked-replay",
        Scenario::Ceiling { .. } => "ceiling",
        Scenario::ClusterRelay(_) => "cluster-relay",
        Scenario::Smoke { .. } => "smoke",
        Scenario::CeilingServe { .. } => ceiling::SUBCOMMAND,
    }
}

/// Starts or attaches to the server, runs the scenario, stops the server.
async fn run(cli: Cli) -> (anyhow::Result<Vec<Report>>, Option<ServerSummary>) {
    if let Scenario::Ceiling { args, threads } = &cli.scenario {
        return (run_ceiling(args, *threads, cli.quiet).await, None);
    }
    if let Scenario::ClusterRelay(args) = &cli.scenario {
        if cli.server.is_some() {
            return (
                Err(anyhow::anyhow!(
                    "cluster-relay starts its own nodes; --server is not supported"
                )),
                None,
            );
        }
        return match node_options(&cli) {
            Ok(opts) => cluster::run(&opts, args, cli.quiet).await,
            Err(e) => (Err(e), None),
        };
    }
    let mut courier = match connect_or_start(&cli).await {
        Ok(c) => c,
        Err(e) => return (Err(e), None),
    };
    let result = run_scenario(&cli, &courier).await;
    let crashed = courier.exited();
    let summary = courier.stop().await;
    let result = result.map(|mut reports| {
        if let Some(status) = crashed {
            if let Some(r) = reports.last_mut() {
                r.fail(format!("courier exited during the run: {status}"));
            }
        }
        reports
    });
    let summary = cli.server.is_none().then_some(summary);
    (result, summary)
}

async fn connect_or_start(cli: &Cli) -> anyhow::Result<Courier> {
    if let Some(url) = &cli.server {
        return Courier::external(url, cli.server_pid);
    }
    let bin = courier_bin(cli)?;
    let (keys, messages) = match &cli.scenario {
        Scenario::Bundles(b) => (b.keys as u64, 0),
        Scenario::Spill(s) => (0, s.messages),
        Scenario::UnackedReplay(u) => (0, u.messages),
        _ => (0, 0),
    };
    let mut env = Vec::new();
    if let Scenario::Flood(f) = &cli.scenario {
        // The one scenario that needs the limits: it measures them holding.
        // Registration stays unlimited so the tool can create its accounts.
        env.push(("COURIER_RATE_LIMITS".into(), "on".into()));
        env.push((
            "COURIER_LIMIT_SENDS_PER_ACCOUNT".into(),
            format!("{}/s", f.send_limit),
        ));
        env.push(("COURIER_LIMIT_REGISTER_PER_IP".into(), "1000000/h".into()));
    }
    if let Scenario::Stalled(s) = &cli.scenario {
        // Copies pushed to the stalled connection are stored after this.
        env.push((
            "COURIER_ACK_TIMEOUT_MS".into(),
            s.ack_timeout_ms.to_string(),
        ));
    }
    env.extend(cli.server_env.iter().cloned());
    let courier = Courier::start(StartOptions {
        bin,
        database_url: cli.database_url.clone(),
        workers: cli.workers,
        env,
        max_one_time_keys: keys.max(100_000),
        mailbox_max_messages: messages.max(1_000_000),
        log_file: cli.server_log.clone(),
    })
    .await?;
    if !cli.quiet {
        eprintln!(
            "courier-load: started courier (pid {}) on {}",
            courier.pid().unwrap_or(0),
            courier.addr
        );
    }
    Ok(courier)
}

/// `--courier-bin`, or `courier` next to this executable.
fn courier_bin(cli: &Cli) -> anyhow::Result<PathBuf> {
    Ok(match &cli.courier_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("own path")?
            .parent()
            .context("own directory")?
            .join("courier"),
    })
}

/// How `cluster-relay` (and the smoke's cluster part) start their nodes.
fn node_options(cli: &Cli) -> anyhow::Result<cluster::NodeOptions> {
    Ok(cluster::NodeOptions {
        bin: courier_bin(cli)?,
        workers: cli.workers,
        env: cli.server_env.clone(),
        log_file: cli.server_log.clone(),
        database_url: cli.database_url.clone(),
    })
}

async fn run_scenario(cli: &Cli, courier: &Courier) -> anyhow::Result<Vec<Report>> {
    let quiet = cli.quiet;
    let target = Target::courier(courier);
    Ok(match &cli.scenario {
        Scenario::Relay {
            args,
            with_ceiling,
            ceiling_threads,
            half_runs,
        } => {
            let mut report = Report::new("relay");
            if *with_ceiling {
                let args = RelayArgs {
                    sweep: args.in_flight.is_none(),
                    ..args.clone()
                };
                let courier_run = relay::run(&target, &args, quiet, &mut report).await?;
                let ceiling = ceiling::Ceiling::start(threads_or_cores(*ceiling_threads))?;
                let ceiling_run =
                    relay::run(&ceiling_target(&ceiling), &args, quiet, &mut report).await?;
                let ratio = match (courier_run.best, ceiling_run.best) {
                    (Some(c), Some(b)) if b > 0.0 => Some(c / b),
                    _ => None,
                };
                report.row(
                    "courier / ceiling",
                    ratio.map_or("n/a".to_owned(), |r| format!("{:.1} %", r * 100.0)),
                );
                report.fig("ratio_to_ceiling", ratio.map(stats::round3));
                relay::compare_cpu(
                    &courier_run,
                    &ceiling_run,
                    args.in_flight.is_some(),
                    &mut report,
                );
                drop(ceiling);
                if let (Some(_), Some(best)) = (args.in_flight, courier_run.best) {
                    let half = RelayArgs {
                        in_flight: None,
                        rate: (best / 2.0).round().max(1.0),
                        ..args.clone()
                    };
                    let runs = (*half_runs).max(1);
                    let threads = threads_or_cores(*ceiling_threads);
                    half_rate(&target, threads, &half, runs, quiet, &mut report).await?;
                }
            } else {
                relay::run(&target, args, quiet, &mut report).await?;
            }
            vec![report]
        }
        Scenario::Spill(args) => {
            vec![spill::run(&courier.base(), courier.addr, args, quiet).await?]
        }
        Scenario::Soak(args) => vec![soak::run(courier, args, quiet).await?],
        Scenario::Flood(args) => vec![flood::run(courier, args, quiet).await?],
        Scenario::Bundles(args) => vec![bundles::run(&courier.base(), args, quiet).await?],
        Scenario::Connections(args) => vec![connections::run(courier, args, quiet).await?],
        Scenario::Stalled(args) => {
            // What the started server was given (a --server-env or the
            // caller's environment may have set it otherwise).
            let ack_timeout = match &cli.server {
                Some(_) => None,
                None => Some(
                    cli.server_env
                        .iter()
                        .rev()
                        .find(|(k, _)| k == "COURIER_ACK_TIMEOUT_MS")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(args.ack_timeout_ms),
                ),
            };
            vec![stalled::run(courier, args, ack_timeout, quiet).await?]
        }
        Scenario::UnackedReplay(args) => vec![unacked::run(courier, args, quiet).await?],
        Scenario::Smoke { vectors } => {
            let mut reports = smoke::run(courier, vectors.clone(), quiet).await;
            // With --server the nodes could not be started like it.
            if cli.server.is_none() {
                reports.push(cluster::smoke(&node_options(cli)?, quiet).await);
            }
            reports
        }
        Scenario::Ceiling { .. } | Scenario::CeilingServe { .. } | Scenario::ClusterRelay(_) => {
            unreachable!("handled without a courier")
        }
    })
}

async fn run_ceiling(
    args: &RelayArgs,
    threads: Option<usize>,
    quiet: bool,
) -> anyhow::Result<Vec<Report>> {
    let ceiling = ceiling::Ceiling::start(threads_or_cores(threads))?;
    let mut report = Report::new("ceiling");
    relay::run(&ceiling_target(&ceiling), args, quiet, &mut report).await?;
    Ok(vec![report])
}

/// Latency where a server has headroom: courier open loop at half its
/// closed-loop rate, `runs` times, each followed by the bare relay at the
/// same rate. The bare relay's figure is the machine's own share of the
/// latency in that moment (a loaded or shared machine delays every process
/// alike), so a run can be read against it.
async fn half_rate(
    target: &Target,
    ceiling_threads: usize,
    half: &RelayArgs,
    runs: usize,
    quiet: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut courier_p99 = Vec::new();
    let mut ceiling_p99 = Vec::new();
    let mut figs = Vec::new();
    for run in 1..=runs {
        let mut scratch = Report::new("relay at half the closed-loop rate");
        let courier = relay::run(target, half, quiet, &mut scratch).await?;
        let ceiling = ceiling::Ceiling::start(ceiling_threads)?;
        let bare = relay::run(&ceiling_target(&ceiling), half, quiet, &mut scratch).await?;
        drop(ceiling);
        for f in &scratch.failures {
            report.fail(f.clone());
        }
        let (Some(c), Some(b)) = (courier.best_step, bare.best_step) else {
            continue;
        };
        report.row(
            &format!("courier at half its rate, run {run}"),
            format!(
                "{:.0} msg/s offered: delivery p50 {:.2} / p99 {:.2} ms (target p99 < 2 ms); \
                 bare relay at the same rate: p50 {:.2} / p99 {:.2} ms",
                half.rate, c.p50_ms, c.p99_ms, b.p50_ms, b.p99_ms
            ),
        );
        courier_p99.push(c.p99_ms);
        ceiling_p99.push(b.p99_ms);
        figs.push(serde_json::json!({
            "p50_ms": c.p50_ms,
            "p99_ms": c.p99_ms,
            "cpu_us_per_msg": c.cpu_us_per_msg,
            "ceiling_p50_ms": b.p50_ms,
            "ceiling_p99_ms": b.p99_ms,
            "ceiling_cpu_us_per_msg": b.cpu_us_per_msg,
        }));
    }
    let (Some(c), Some(b)) = (median(&courier_p99), median(&ceiling_p99)) else {
        return Ok(());
    };
    report.row(
        "courier at half its rate, median",
        format!(
            "delivery p99 {c:.2} ms over {} run(s) (target < 2 ms); bare relay at the same rate {b:.2} ms",
            courier_p99.len()
        ),
    );
    report.fig(
        "half_rate",
        serde_json::json!({
            "rate": half.rate,
            "p99_ms_median": c,
            "ceiling_p99_ms_median": b,
            "runs": figs,
        }),
    );
    Ok(())
}

/// The middle value (the lower of the two middle ones for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied()
}

fn ceiling_target(c: &ceiling::Ceiling) -> Target {
    Target {
        name: "ceiling",
        addr: c.addr,
        http_base: None,
        has_mailbox: false,
        pid: Some(c.pid()),
        receiver_addrs: Vec::new(),
        extra_pids: Vec::new(),
    }
}

fn threads_or_cores(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

fn server_json(s: &ServerSummary) -> Value {
    json!({
        "exit": s.exit,
        "log_warnings": s.warnings,
        "log_errors": s.errors,
        "log_problems": s.problems,
    })
}

/// Prints the tables and the RESULT line; the exit status.
fn finish(name: &str, mut reports: Vec<Report>, summary: Option<ServerSummary>) -> ExitCode {
    if let (Some(s), Some(last)) = (&summary, reports.last_mut()) {
        if s.exit.as_deref().is_some_and(|e| e != "exit status: 0") {
            last.warn(format!(
                "courier after SIGTERM: {}",
                s.exit.as_deref().unwrap_or("")
            ));
        }
        if s.errors > 0 || s.warnings > 0 {
            last.warn(format!(
                "courier logged {} errors and {} warnings (first: {:?})",
                s.errors,
                s.warnings,
                s.problems.first()
            ));
        }
    }
    for r in &reports {
        r.print_table();
    }
    let ok = reports.iter().all(Report::ok);
    let mut j = if let [only] = reports.as_slice() {
        only.json()
    } else {
        json!({
            "scenario": name,
            "ok": ok,
            "parts": reports.iter().map(Report::json).collect::<Vec<_>>(),
        })
    };
    if let Some(s) = &summary {
        j["server"] = server_json(s);
    }
    println!("RESULT {j}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
