//! `smoke`: every courier scenario at a small size, in a few seconds, for
//! CI. It asserts completion and correctness only (nothing lost or out of
//! order, every spilled message drained, no one-time prekey handed out
//! twice, every connection up, soak memory bounded, a stalled reader holding
//! nobody up, an unacked replay staying within its bound); the figures are
//! printed but not judged.

use crate::bundles::{self, BundlesArgs};
use crate::connections::{self, ConnectionsArgs};
use crate::relay::{self, RelayArgs, Target};
use crate::server::Courier;
use crate::soak::{self, SoakArgs};
use crate::spill::{self, SpillArgs};
use crate::stalled::{self, StalledArgs};
use crate::stats::Report;
use crate::unacked::{self, UnackedArgs};

/// Runs the parts one after another against `server`; a part that cannot
/// run at all becomes a failed report, and the others still run.
pub async fn run(server: &Courier, vectors: std::path::PathBuf, quiet: bool) -> Vec<Report> {
    let mut reports = Vec::new();

    let target = Target::courier(server);
    let relay_args = RelayArgs {
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
    };
    let mut r = Report::new("relay");
    if let Err(e) = relay::run(&target, &relay_args, quiet, &mut r).await {
        r.fail(format!("could not run: {e:#}"));
    }
    reports.push(r);
    // Closed loop (pipelined sends per connection, as fast as answered).
    let closed_args = RelayArgs {
        in_flight: Some(16),
        duration: 1.0,
        max_rate: 200_000.0,
        ..relay_args.clone()
    };
    let mut r = Report::new("relay closed loop");
    if let Err(e) = relay::run(&target, &closed_args, quiet, &mut r).await {
        r.fail(format!("could not run: {e:#}"));
    }
    reports.push(r);

    let spill_args = SpillArgs {
        messages: 2000,
        recipients: 20,
        senders: 4,
        in_flight: 64,
        size: 256,
        no_drain: false,
        timeout_secs: 120.0,
    };
    reports.push(
        spill::run(&server.base(), server.addr, &spill_args, quiet)
            .await
            .unwrap_or_else(|e| failed("spill", e)),
    );

    let bundles_args = BundlesArgs {
        devices: 4,
        keys: 50,
        fetchers: 4,
        fetches: 200,
        vectors,
    };
    reports.push(
        bundles::run(&server.base(), &bundles_args, quiet)
            .await
            .unwrap_or_else(|e| failed("bundles", e)),
    );

    let connections_args = ConnectionsArgs {
        count: 200,
        per_source: 20_000,
        concurrency: 64,
        hold_secs: 1.0,
    };
    reports.push(
        connections::run(server, &connections_args, quiet)
            .await
            .unwrap_or_else(|e| failed("connections", e)),
    );

    let soak_args = SoakArgs {
        pairs: 4,
        rate: 500.0,
        duration: 2.0,
        window: 1.0,
        churn: 10,
        size: 256,
        max_growth_mib: 64,
    };
    reports.push(
        soak::run(server, &soak_args, quiet)
            .await
            .unwrap_or_else(|e| failed("soak", e)),
    );

    // The server keeps its default ack timeout (2 s): the sends are answered
    // `queued` after it.
    let stalled_args = StalledArgs {
        messages: 8,
        size: 150 * 1024,
        rcvbuf: 4096,
        ack_timeout_ms: 0, // not used: the server is already running
        answer_limit_secs: 10.0,
        queue_empty_limit_secs: 5.0,
        waves: 1,
        replace_after_ms: None,
    };
    reports.push(
        stalled::run(server, &stalled_args, None, quiet)
            .await
            .unwrap_or_else(|e| failed("stalled", e)),
    );
    // The same, replaced while the stalled connection still holds the copies.
    let early_args = StalledArgs {
        replace_after_ms: Some(300),
        ..stalled_args
    };
    let mut early = stalled::run(server, &early_args, None, quiet)
        .await
        .unwrap_or_else(|e| failed("stalled", e));
    early.scenario = "stalled (replaced at 300 ms)".into();
    reports.push(early);

    // 16 KiB copies: the 1,000-copy bound is reached before the 16 MiB one.
    let unacked_args = UnackedArgs {
        messages: 1_200,
        size: 16 * 1024,
        read_secs: 1.0,
        senders: 2,
        in_flight: 32,
        timeout_secs: 60.0,
    };
    reports.push(
        unacked::run(server, &unacked_args, quiet)
            .await
            .unwrap_or_else(|e| failed("unacked-replay", e)),
    );
    reports
}

fn failed(scenario: &str, e: anyhow::Error) -> Report {
    let mut r = Report::new(scenario);
    r.fail(format!("could not run: {e:#}"));
    r
}
