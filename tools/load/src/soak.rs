//! `soak`: a steady relay for a set time (documented run: 10 minutes) with
//! connection churn, sampling the server's resident memory after every
//! window. Memory must stay flat: growth would mean a leak in the router's
//! map, the sessions' pending-ack tables, the rate limiters or the caches.
//!
//! Each window runs one fixed-rate relay step over the same pairs, while
//! `--churn` other devices connect, read their (empty) mailbox and
//! disconnect, so router entries are added and removed all the time. The
//! first window is warm-up: growth is measured from the end of it.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::json;

use crate::client::{self, drain_until_queue_empty};
use crate::relay::{make_pairs, run_step, StepConfig, Target};
use crate::server::Courier;
use crate::stats::Report;

#[derive(clap::Args, Clone, Debug)]
pub struct SoakArgs {
    /// Sender/receiver pairs relaying all the time.
    #[arg(long, default_value_t = 16)]
    pub pairs: usize,
    /// Offered rate, messages per second, over all pairs.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Total length of the run, seconds (documented soak: 600).
    #[arg(long, default_value_t = 600.0)]
    pub duration: f64,
    /// Length of one window between memory samples, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub window: f64,
    /// Devices that connect and disconnect during each window.
    #[arg(long, default_value_t = 50)]
    pub churn: usize,
    /// Ciphertext bytes per message.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Fail when resident memory grows by more than this many MiB after the
    /// warm-up window.
    #[arg(long, default_value_t = 32)]
    pub max_growth_mib: u64,
}

pub async fn run(server: &Courier, args: &SoakArgs, quiet: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("soak");
    let base = server.base();
    let target = Target::courier(server);
    let pairs = make_pairs(&target, args.pairs, quiet).await?;
    let churners = client::register_many(&base, args.churn, 16, None).await?;
    let windows = (args.duration / args.window).ceil().max(2.0) as usize;
    let cfg = StepConfig {
        rate: args.rate,
        duration: Duration::from_secs_f64(args.window),
        warmup: Duration::ZERO,
        size: args.size,
        grace: Duration::from_secs(5),
        quiet: true,
        window: None,
    };
    let started = Instant::now();
    let mut samples: Vec<u64> = Vec::new();
    let (mut sent, mut delivered, mut churned) = (0u64, 0u64, 0u64);
    for w in 0..windows {
        let churn = async {
            let mut done = 0u64;
            for chunk in churners.chunks(10) {
                let rounds = join_all(chunk.iter().map(|d| async {
                    let mut ws = client::connect(server.addr, d, None).await.ok()?;
                    drain_until_queue_empty(&mut ws, Duration::from_secs(10), None)
                        .await
                        .ok()?;
                    let _ = ws.close(None).await;
                    Some(())
                }))
                .await;
                done += rounds.iter().filter(|r| r.is_some()).count() as u64;
            }
            done
        };
        let (step, churn_done) = tokio::join!(run_step(&target, &pairs, &cfg), churn);
        sent += step.sent;
        delivered += step.received_live + step.recovered_from_mailbox;
        churned += churn_done;
        for f in step.correctness_failures() {
            report.fail(format!("window {w}: {f}"));
        }
        if step.errors() > 0 {
            report.fail(format!("window {w}: {} errors", step.errors()));
        }
        if churn_done < churners.len() as u64 {
            report.fail(format!(
                "window {w}: only {churn_done} of {} churn connections completed",
                churners.len()
            ));
        }
        let rss = server.rss_kib();
        if let Some(kib) = rss {
            samples.push(kib);
        }
        if !quiet {
            eprintln!(
                "[{:>6.0}s] soak window {}/{}: {} sent, delivery p99 {:.2} ms, rss {}",
                started.elapsed().as_secs_f64(),
                w + 1,
                windows,
                step.sent,
                step.delivery_latency.ms(0.99),
                rss.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            );
        }
    }

    let mib = |k: u64| k as f64 / 1024.0;
    report.row(
        "run",
        format!(
            "{windows} windows of {} s, {} pairs at {} msg/s",
            args.window, args.pairs, args.rate
        ),
    );
    report.row("messages", format!("{sent} sent, {delivered} delivered"));
    report.row("churn", format!("{churned} connect/disconnect cycles"));
    match (samples.first(), samples.last(), samples.iter().max()) {
        (Some(&first), Some(&last), Some(&max)) => {
            report.row(
                "server rss",
                format!(
                    "after warm-up {:.1} MiB, end {:.1} MiB, max {:.1} MiB",
                    mib(first),
                    mib(last),
                    mib(max)
                ),
            );
            let growth = last.saturating_sub(first);
            report.row("rss growth", format!("{:.1} MiB", mib(growth)));
            if growth > args.max_growth_mib * 1024 {
                report.fail(format!(
                    "server memory grew {:.1} MiB (limit {} MiB)",
                    mib(growth),
                    args.max_growth_mib
                ));
            }
            report.fig(
                "rss_kib",
                json!({"after_warmup": first, "end": last, "max": max, "samples": samples}),
            );
        }
        _ => report.warn("server memory not readable (external server without --server-pid)"),
    }
    report.fig(
        "soak",
        json!({"windows": windows, "window_s": args.window, "rate": args.rate,
               "sent": sent, "delivered": delivered, "churn_cycles": churned}),
    );
    Ok(report)
}
