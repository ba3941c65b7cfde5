//! `relay` (and, against the bare relay built into the tool, `ceiling`): live
//! message relay between connected devices.
//!
//! N sender/receiver pairs, each device on its own WebSocket. Every sender
//! sends to its receiver at a fixed offered rate (the total `--rate` spread
//! evenly over the senders, open loop: message k of sender i is due at
//! `(i + k·N) / R` seconds whatever happened to earlier ones). Receivers ack
//! every `message` at once. It measures what a chatting user feels:
//!
//! - answer latency: send frame written → `response` frame read by the sender
//!   (for courier that includes the receiver's ack: the SPEC answers a send
//!   only once the copy is acknowledged or committed);
//! - delivery latency: send frame written → `message` frame read by the
//!   receiver (the send time travels inside the content);
//! - send lag: how late the sender wrote each frame relative to its schedule
//!   (the tool falling behind, or the server not reading: backpressure);
//! - loss: answered 200 but never received, neither live nor from the
//!   mailbox on a reconnect afterwards (the SPEC's "an answered send is never
//!   lost");
//! - order: a delivery with a lower sequence number than one already
//!   delivered on that pair (the SPEC keeps per-(source, destination) order).
//!
//! `--sweep` runs short steps at increasing rates (doubling, then bisecting)
//! and reports the highest rate whose delivery p99 stays under `--p99-ms`
//! with nothing lost, nothing failed and the senders on schedule.
//!
//! Every run and step also reports the server's CPU time per relayed
//! message (see [`crate::cpu`]); [`compare_cpu`] sets courier's against the
//! bare relay's (`relay --with-ceiling`).

mod peer;
mod result;
mod step;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::client::{self, Device};
use crate::cpu;
use crate::stats::{round1, round3, Progress, Report};

pub use result::StepResult;
pub use step::{run_step, StepConfig};

/// Options shared by `relay` and `ceiling`.
#[derive(clap::Args, Clone, Debug)]
pub struct RelayArgs {
    /// Sender/receiver pairs (2 WebSockets each).
    #[arg(long, default_value_t = 16)]
    pub pairs: usize,
    /// Total offered rate in messages per second, over all senders.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of sending (a fixed-rate run).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Content bytes per message (at least 24: the timing stamp).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Find the highest rate meeting --p99-ms with nothing lost.
    #[arg(long)]
    pub sweep: bool,
    /// Seconds per sweep step.
    #[arg(long, default_value_t = 3.0)]
    pub step_secs: f64,
    /// First sweep rate (msg/s); doubled while steps pass.
    #[arg(long, default_value_t = 1000.0)]
    pub start_rate: f64,
    /// The sweep never offers more than this (msg/s).
    #[arg(long, default_value_t = 256_000.0)]
    pub max_rate: f64,
    /// Bisection steps between the last passing and first failing rate.
    #[arg(long, default_value_t = 3)]
    pub bisect_steps: u32,
    /// Re-runs of a sweep step that falls short before it counts as failed.
    #[arg(long, default_value_t = 1)]
    pub confirm: u32,
    /// Delivery p99 a sweep step must stay under (ms).
    #[arg(long, default_value_t = 10.0)]
    pub p99_ms: f64,
    /// Seconds to wait for outstanding answers after the last send.
    #[arg(long, default_value_t = 10.0)]
    pub grace_secs: f64,
    /// Seconds at the start of each run whose messages are sent, checked
    /// and counted, but left out of the latency figures (answer, delivery,
    /// send lag): every run starts on fresh devices and connections, so its
    /// first moments measure a cold start (each new account's first reads,
    /// a backlog drained with little spare CPU), not the steady state. 0
    /// measures from the first message. Within --duration / --step-secs.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Share (0–1) of a sweep step's sends that must be answered
    /// `delivered`, not `queued`, for it to pass. Not an option of `relay`
    /// (one node answers `queued` only past its ack timeout, which the p99
    /// limit already rules out); `cluster-relay` sets it from
    /// `--min-delivered-pct`, since a cross-node copy whose confirmation is
    /// late is answered `queued` yet still arrives live.
    #[arg(skip)]
    pub min_delivered: f64,
    /// Closed loop instead of a fixed rate: each sender keeps this many
    /// sends unanswered (as fast as the answers come), for --duration
    /// seconds; --max-rate only caps it. With --with-ceiling: both servers
    /// so, then courier open loop at half its closed-loop rate (latency).
    #[arg(long)]
    pub in_flight: Option<u64>,
}

/// What the relay clients talk to.
#[derive(Clone, Debug)]
pub struct Target {
    /// `courier` or `ceiling`, for the report.
    pub name: &'static str,
    pub addr: SocketAddr,
    /// `http://…` for registration; `None` for the ceiling (no accounts).
    pub http_base: Option<String>,
    /// Whether spilled copies can be fetched again by reconnecting.
    pub has_mailbox: bool,
    /// The server process, whose CPU time is measured (`None`: unknown).
    pub pid: Option<u32>,
    /// Where receivers connect: receiver `i` to `receiver_addrs[i % len]`,
    /// or to `addr` when empty. `cluster-relay` puts them on other nodes
    /// than the senders this way.
    pub receiver_addrs: Vec<SocketAddr>,
    /// Further server processes whose CPU time counts with `pid`'s (the
    /// other nodes of a cluster: a cross-node copy costs CPU on both).
    pub extra_pids: Vec<u32>,
}

impl Target {
    /// A courier server (registration over HTTP, a mailbox behind it).
    pub fn courier(server: &crate::server::Courier) -> Target {
        Target {
            name: "courier",
            addr: server.addr,
            http_base: Some(server.base()),
            has_mailbox: true,
            pid: server.pid(),
            receiver_addrs: Vec::new(),
            extra_pids: Vec::new(),
        }
    }

    /// Where receiver `i` connects.
    pub fn receiver_addr(&self, i: usize) -> SocketAddr {
        match self.receiver_addrs.len() {
            0 => self.addr,
            n => self.receiver_addrs[i % n],
        }
    }

    /// Every server process whose CPU time is measured.
    pub fn pids(&self) -> Vec<u32> {
        self.pid
            .into_iter()
            .chain(self.extra_pids.iter().copied())
            .collect()
    }
}

/// A sender and the receiver it sends to.
#[derive(Clone, Debug)]
pub struct Pair {
    pub sender: Device,
    pub receiver: Device,
}

/// Registers (courier) or invents (ceiling) the devices for `n` pairs.
pub async fn make_pairs(target: &Target, n: usize, quiet: bool) -> anyhow::Result<Vec<Pair>> {
    let devices = match &target.http_base {
        Some(base) => {
            let progress = Progress::new("register", &["accounts"], 0);
            let _line = progress.report_every_second(quiet);
            client::register_many(base, 2 * n, 32, Some(progress.counter(0))).await?
        }
        None => (0..2 * n).map(Device::fabricated).collect(),
    };
    let mut it = devices.into_iter();
    let mut pairs = Vec::with_capacity(n);
    while let (Some(sender), Some(receiver)) = (it.next(), it.next()) {
        pairs.push(Pair { sender, receiver });
    }
    Ok(pairs)
}

/// What a sweep tried and found.
pub struct Sweep {
    /// Every step: rate, result, and why it fell short (`None`: passed).
    pub steps: Vec<(f64, StepResult, Option<String>)>,
    /// The highest passing rate.
    pub best: Option<f64>,
}

/// Steps at increasing rates: doubling from `--start-rate` while steps pass
/// (halving instead if the first fails), then bisecting between the last
/// pass and the first failure. At most ~30 steps; every step is bounded.
pub async fn sweep(target: &Target, pairs: &[Pair], args: &RelayArgs, quiet: bool) -> Sweep {
    let mut steps = Vec::new();
    let max_rate = args.max_rate.max(1.0);
    let start = args.start_rate.clamp(1.0, max_rate);
    let mut lo: Option<f64> = None;
    let mut hi: Option<f64> = None;

    let mut rate = start;
    loop {
        if sweep_step(target, pairs, args, rate, quiet, &mut steps).await {
            lo = Some(rate);
            if rate * 2.0 > max_rate || steps.len() >= 20 {
                break;
            }
            rate *= 2.0;
        } else {
            hi = Some(rate);
            break;
        }
    }
    if lo.is_none() {
        let mut r = start / 2.0;
        while r >= start / 16.0 {
            if sweep_step(target, pairs, args, r, quiet, &mut steps).await {
                lo = Some(r);
                break;
            }
            hi = Some(r);
            r /= 2.0;
        }
    }
    if let (Some(mut l), Some(mut h)) = (lo, hi) {
        for _ in 0..args.bisect_steps {
            if (h - l) / l < 0.05 {
                break;
            }
            let mid = ((l + h) / 2.0).round();
            if sweep_step(target, pairs, args, mid, quiet, &mut steps).await {
                l = mid;
            } else {
                h = mid;
            }
        }
        lo = Some(l);
    }
    Sweep { steps, best: lo }
}

async fn sweep_step(
    target: &Target,
    pairs: &[Pair],
    args: &RelayArgs,
    rate: f64,
    quiet: bool,
    steps: &mut Vec<(f64, StepResult, Option<String>)>,
) -> bool {
    let cfg = StepConfig {
        rate,
        duration: Duration::from_secs_f64(args.step_secs),
        warmup: Duration::from_secs_f64(args.warmup_secs),
        size: args.size,
        grace: Duration::from_secs_f64(args.grace_secs),
        quiet: true,
        window: None,
    };
    // A shortfall is confirmed by running the step again (`--confirm`
    // times): on a shared machine one stall elsewhere should not decide the
    // rate. Every attempt is reported, and a correctness failure in any of
    // them fails the run regardless.
    for attempt in 0..=args.confirm {
        let result = run_step(target, pairs, &cfg).await;
        let shortfall = result.shortfall(args.p99_ms, args.min_delivered);
        if !quiet {
            eprintln!(
                "sweep {}: {:>8.0} msg/s offered, {:>8.0} delivered/s, delivery {} → {}{}",
                target.name,
                rate,
                result.delivered_rate(),
                result.delivery_latency.summary(),
                shortfall.as_deref().unwrap_or("pass"),
                if attempt > 0 { " (again)" } else { "" }
            );
        }
        let pass = shortfall.is_none();
        let correct = result.correctness_failures().is_empty();
        steps.push((rate, result, shortfall));
        // Let queued work drain before the next step.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if pass || !correct {
            return pass;
        }
    }
    false
}

/// Checks the options every relay-style run needs.
pub fn validate(args: &RelayArgs, report: &mut Report) -> anyhow::Result<()> {
    if args.pairs == 0 || args.pairs > 50_000 {
        anyhow::bail!("--pairs must be in 1..=50000");
    }
    if args.confirm > 10 || args.bisect_steps > 20 {
        anyhow::bail!("--confirm ≤ 10 and --bisect-steps ≤ 20 keep a sweep bounded");
    }
    let within = |x: f64, max: f64| x.is_finite() && x > 0.0 && x <= max;
    if !within(args.rate, 1e9) || !within(args.start_rate, 1e9) || !within(args.max_rate, 1e9) {
        anyhow::bail!("rates must be positive");
    }
    let durations_ok = within(args.duration, 3600.0)
        && within(args.step_secs, 600.0)
        && (args.grace_secs == 0.0 || within(args.grace_secs, 600.0));
    if !durations_ok {
        anyhow::bail!("--duration ≤ 3600 s, --step-secs ≤ 600 s, --grace-secs ≤ 600 s");
    }
    let window = if args.sweep {
        args.step_secs
    } else {
        args.duration
    };
    if !(args.warmup_secs.is_finite() && (0.0..window).contains(&args.warmup_secs)) {
        anyhow::bail!("--warmup-secs must be at least 0 and less than the run ({window} s)");
    }
    if args.size < client::STAMP_LEN {
        report.warn(format!(
            "--size {} is below the {}-byte timing stamp; sending {} bytes",
            args.size,
            client::STAMP_LEN,
            client::STAMP_LEN
        ));
    }
    Ok(())
}

/// What a relay-style run found, for setting two targets side by side.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The sweep's highest passing rate (`None`: a fixed-rate run, or no
    /// step passed).
    pub best: Option<f64>,
    /// Server CPU µs per relayed message by offered rate: every passing
    /// sweep step, or the one fixed-rate run.
    pub cpu_by_rate: Vec<(f64, f64)>,
    /// The sweep's (last) step at its best rate, or the fixed-rate run.
    pub best_step: Option<Brief>,
    /// Sends answered 200 over every step (per-message figures taken
    /// outside the tool, e.g. Redis's, divide by this).
    pub answered_ok: u64,
}

/// The figures of one run that a comparison sets side by side.
#[derive(Clone, Copy, Debug, Default)]
pub struct Brief {
    pub rate: f64,
    pub delivered_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Share of sends answered `delivered` (0–1).
    pub delivered_share: f64,
    pub cpu_us_per_msg: Option<f64>,
}

impl Brief {
    fn of(r: &StepResult) -> Brief {
        Brief {
            rate: r.rate,
            delivered_rate: r.delivered_rate(),
            p50_ms: r.delivery_latency.ms(0.50),
            p99_ms: r.delivery_latency.ms(0.99),
            delivered_share: r.delivered_share(),
            cpu_us_per_msg: r.server_cpu.and_then(|c| c.us_per_msg()),
        }
    }
}

impl Outcome {
    /// CPU µs per message of the (last) passing step at `rate`.
    pub fn cpu_at(&self, rate: f64) -> Option<f64> {
        self.cpu_by_rate
            .iter()
            .rev()
            .find(|(r, _)| same_rate(*r, rate))
            .map(|(_, us)| *us)
    }

    /// CPU µs per message at the sweep's best rate.
    pub fn cpu_at_best(&self) -> Option<f64> {
        self.cpu_at(self.best?)
    }
}

/// Offered rates are whole msg/s in every sweep (doubling an integer start,
/// rounded bisection midpoints).
fn same_rate(a: f64, b: f64) -> bool {
    (a - b).abs() < 0.5
}

/// Courier's server CPU per relayed message against the bare relay's (issue
/// 13: at most 3 ×): at the highest offered rate both sweeps passed (the
/// same load on the machine), and each at its own max rate.
/// `closed_loop`: one run each (`--in-flight`), compared at each one's rate.
pub fn compare_cpu(courier: &Outcome, ceiling: &Outcome, closed_loop: bool, report: &mut Report) {
    let same = courier
        .cpu_by_rate
        .iter()
        .filter_map(|&(rate, c)| Some((rate, c, ceiling.cpu_at(rate)?)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let at_max = courier.cpu_at_best().zip(ceiling.cpu_at_best());
    let ratio = |c: f64, b: f64| (b > 0.0).then(|| c / b);
    let times = |r: Option<f64>| r.map_or("n/a".to_owned(), |r| format!("{r:.2} ×"));
    if !closed_loop {
        report.row(
        "server CPU courier / ceiling",
        match same {
            Some((rate, c, b)) => format!(
                "{} at {rate:.0} msg/s, the highest rate both passed ({c:.1} vs {b:.1} µs/msg); target ≤ 3 ×",
                times(ratio(c, b))
            ),
            None => "n/a (no rate passed by both with CPU figures)".into(),
        },
    );
    }
    report.row(
        if closed_loop {
            "server CPU courier / ceiling, each at its max"
        } else {
            "  each at its max rate"
        },
        match at_max {
            Some((c, b)) => format!(
                "{} ({c:.1} vs {b:.1} µs/msg); target ≤ 3 ×",
                times(ratio(c, b))
            ),
            None => "n/a".into(),
        },
    );
    report.fig(
        "cpu_ratio_to_ceiling",
        json!({
            "same_rate": same.map(|(rate, c, b)| json!({
                "rate": rate,
                "courier_us_per_msg": round1(c),
                "ceiling_us_per_msg": round1(b),
                "ratio": ratio(c, b).map(round3),
            })),
            "at_max_rate": at_max.map(|(c, b)| json!({
                "courier_rate": courier.best,
                "ceiling_rate": ceiling.best,
                "courier_us_per_msg": round1(c),
                "ceiling_us_per_msg": round1(b),
                "ratio": ratio(c, b).map(round3),
            })),
        }),
    );
}

/// A relay-style run (fixed rate, or sweep) against `target`, into
/// `report`.
pub async fn run(
    target: &Target,
    args: &RelayArgs,
    quiet: bool,
    report: &mut Report,
) -> anyhow::Result<Outcome> {
    validate(args, report)?;
    let pairs = make_pairs(target, args.pairs, quiet).await?;
    if !args.sweep {
        // Closed loop: the plan runs at --max-rate, the window binds.
        let cfg = StepConfig {
            rate: if args.in_flight.is_some() {
                args.max_rate
            } else {
                args.rate
            },
            duration: Duration::from_secs_f64(args.duration),
            warmup: Duration::from_secs_f64(args.warmup_secs),
            size: args.size,
            grace: Duration::from_secs_f64(args.grace_secs),
            quiet,
            window: args.in_flight,
        };
        let r = run_step(target, &pairs, &cfg).await;
        r.rows(report);
        report.fig(target.name, r.json());
        for f in r.correctness_failures() {
            report.fail(f);
        }
        if r.errors() > 0 {
            report.fail(format!("{}: {} errors", target.name, r.errors()));
        }
        if r.unanswered > 0 {
            report.fail(format!(
                "{}: {} sends never answered within {} s",
                target.name, r.unanswered, args.grace_secs
            ));
        }
        if r.sent < r.planned && r.window.is_none() {
            report.warn(format!(
                "{}: only {} of {} planned messages were sent before the deadline",
                target.name, r.sent, r.planned
            ));
        }
        let cpu = r.server_cpu.and_then(|c| c.us_per_msg());
        let closed_rate = r
            .window
            .map(|_| r.answered_ok() as f64 / r.duration.as_secs_f64());
        return Ok(Outcome {
            best: closed_rate,
            cpu_by_rate: cpu
                .map(|us| (closed_rate.unwrap_or(args.rate), us))
                .into_iter()
                .collect(),
            best_step: Some(Brief::of(&r)),
            answered_ok: r.answered_ok(),
        });
    }

    let sw = sweep(target, &pairs, args, quiet).await;
    report.row(
        &format!("{} sweep", target.name),
        format!(
            "{} pairs, {} B, {} s steps, pass = delivery p99 < {} ms, nothing lost or failed",
            args.pairs, args.size, args.step_secs, args.p99_ms
        ),
    );
    let mut steps_json = Vec::new();
    let mut outcome = Outcome {
        best: sw.best,
        ..Outcome::default()
    };
    for (rate, r, shortfall) in &sw.steps {
        outcome.answered_ok += r.answered_ok();
        if shortfall.is_none() && sw.best.is_some_and(|b| same_rate(b, *rate)) {
            outcome.best_step = Some(Brief::of(r));
        }
        report.row(
            &format!("  {rate:.0} msg/s"),
            format!(
                "{:.0} delivered/s, delivery p50 {:.2} / p99 {:.2} ms, answer p99 {:.2} ms, \
                 server CPU {}: {}",
                r.delivered_rate(),
                r.delivery_latency.ms(0.50),
                r.delivery_latency.ms(0.99),
                r.answer_latency.ms(0.99),
                cpu::us_or_na(r.server_cpu.as_ref()),
                shortfall.as_deref().unwrap_or("pass")
            ),
        );
        for f in r.correctness_failures() {
            report.fail(f);
        }
        if shortfall.is_none() {
            if let Some(us) = r.server_cpu.and_then(|c| c.us_per_msg()) {
                outcome.cpu_by_rate.push((*rate, us));
            }
        }
        let mut j = r.json();
        j["pass"] = json!(shortfall.is_none());
        j["shortfall"] = json!(shortfall);
        steps_json.push(j);
    }
    report.row(
        &format!("{} max rate", target.name),
        match sw.best {
            Some(b) => format!("{b:.0} msg/s"),
            None => "no step passed".into(),
        },
    );
    let cpu_at_max = outcome.cpu_at_best();
    report.row(
        &format!("{} server CPU", target.name),
        match (cpu_at_max, sw.best) {
            (Some(us), Some(b)) => format!("{us:.1} µs per relayed message at {b:.0} msg/s"),
            _ => "n/a".into(),
        },
    );
    if sw.best.is_none() {
        report.warn(format!("{}: no sweep step passed", target.name));
    }
    report.fig(
        target.name,
        json!({
            "max_rate": sw.best,
            "cpu_us_per_msg_at_max_rate": cpu_at_max.map(round1),
            "p99_ms_limit": args.p99_ms,
            "pairs": args.pairs,
            "size": args.size,
            "step_s": args.step_secs,
            "steps": steps_json,
        }),
    );
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_compared_at_the_highest_common_rate_and_at_each_max() {
        let courier = Outcome {
            best: Some(160_000.0),
            cpu_by_rate: vec![(64_000.0, 20.0), (128_000.0, 18.0), (160_000.0, 17.0)],
            ..Outcome::default()
        };
        let ceiling = Outcome {
            best: Some(352_000.0),
            cpu_by_rate: vec![(128_000.0, 6.0), (256_000.0, 5.0), (352_000.0, 4.0)],
            ..Outcome::default()
        };
        let mut r = Report::new("relay");
        compare_cpu(&courier, &ceiling, false, &mut r);
        let j = &r.figures["cpu_ratio_to_ceiling"];
        assert_eq!(j["same_rate"]["rate"], 128_000.0);
        assert_eq!(j["same_rate"]["ratio"], 3.0);
        assert_eq!(j["at_max_rate"]["ratio"], 4.25);
        compare_cpu(&courier, &Outcome::default(), false, &mut r);
        assert!(r.figures["cpu_ratio_to_ceiling"]["same_rate"].is_null());
    }

    #[test]
    fn the_warm_up_must_leave_part_of_the_run_measured() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            relay: RelayArgs,
        }
        let args = |extra: &[&str]| {
            let argv = ["relay"].iter().chain(extra).copied();
            Cli::try_parse_from(argv).expect("parses").relay
        };
        let mut r = Report::new("relay");
        assert_eq!(args(&[]).warmup_secs, 1.0, "the default");
        assert!(validate(&args(&["--duration", "10"]), &mut r).is_ok());
        assert!(validate(&args(&["--warmup-secs", "0"]), &mut r).is_ok());
        assert!(validate(&args(&["--duration", "1"]), &mut r).is_err());
        assert!(validate(&args(&["--warmup-secs=-1"]), &mut r).is_err());
        // A sweep's runs are its steps.
        let sweep = args(&["--sweep", "--step-secs", "3", "--warmup-secs", "3"]);
        assert!(validate(&sweep, &mut r).is_err());
    }
}
