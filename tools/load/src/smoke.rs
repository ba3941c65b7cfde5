//! `smoke`: every courier scenario at a small size, in a few seconds, for
//! CI. It asserts completion and correctness only (nothing lost or out of
//! order, every spilled message drained, no one-time prekey handed out
//! twice, every connection up, soak memory bounded); the figures are
//! printed but not judged.

use crate::bundles::{self, BundlesArgs};
use crate::connections::{self, ConnectionsArgs};
use crate::relay::{self, RelayArgs, Target};
use crate::server::Courier;
use crate::soak::{self, SoakArgs};
use crate::spill::{self, SpillArgs};
use crate::stats::Report;

/// Runs the parts one after another against `server`; a part that cannot
/// run at all becomes a failed report, and the others still run.
pub async fn run(server: &Courier, vectors: std::path::PathBuf, quiet: bool) -> Vec<Report> {
    let mut reports = Vec::new();

    let target = Target {
        name: "courier",
        addr: server.addr,
        http_base: Some(server.base()),
        has_mailbox: true,
    };
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
    };
    let mut r = Report::new("relay");
    if let Err(e) = relay::run(&target, &relay_args, quiet, &mut r).await {
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
    reports
}

fn failed(scenario: &str, e: anyhow::Error) -> Report {
    let mut r = Report::new(scenario);
    r.fail(format!("could not run: {e:#}"));
    r
}
