//! `flood`: what ordinary users feel while others abuse the server.
//!
//! The server runs WITH rate limits (the tool starts it with
//! `COURIER_RATE_LIMITS=on` and a send limit of `--send-limit` per account).
//! Two phases of the same length over the same pairs:
//!
//! 1. baseline: `--pairs` ordinary pairs relay at `--rate` (below the limit);
//! 2. flood: the same relay, while `--flooders` accounts each pipeline sends
//!    over their WebSocket as fast as the server answers (most must be `429`)
//!    and `--oversize` HTTP clients PUT messages over the 256 KiB limit
//!    (every one must be `413`).
//!
//! It reports the ordinary pairs' delivery and answer latency in both phases
//! and what the flooders got back. It fails if an ordinary user gets any
//! error or loses a message, if a flooder is never limited, if an oversize
//! message is not refused with `413`, or on any 5xx.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, close_quietly, drain_until_queue_empty, Device, ServerFrame};
use crate::relay::{make_pairs, run_step, StepConfig, StepResult, Target};
use crate::server::Courier;
use crate::stats::Report;

/// The send limit the self-started server gets, per account (GCRA: this many
/// per second, with a burst of as many).
pub const DEFAULT_SEND_LIMIT: u32 = 100;

#[derive(clap::Args, Clone, Debug)]
pub struct FloodArgs {
    /// Ordinary sender/receiver pairs.
    #[arg(long, default_value_t = 16)]
    pub pairs: usize,
    /// Ordinary offered rate, messages per second over all pairs (each
    /// sender stays below the per-account limit).
    #[arg(long, default_value_t = 800.0)]
    pub rate: f64,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Accounts flooding sends over their WebSocket.
    #[arg(long, default_value_t = 8)]
    pub flooders: usize,
    /// Unanswered sends each flooder keeps in flight.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// HTTP clients sending oversize messages.
    #[arg(long, default_value_t = 2)]
    pub oversize: usize,
    /// Sends per second per account the self-started server allows.
    #[arg(long, default_value_t = DEFAULT_SEND_LIMIT)]
    pub send_limit: u32,
}

/// What the abusers got back, by HTTP status.
#[derive(Default, Debug)]
struct FloodTally {
    sends: u64,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
}

impl FloodTally {
    fn add(&mut self, other: FloodTally) {
        self.sends += other.sends;
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
    }

    fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    fn server_errors(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum()
    }
}

pub async fn run(server: &Courier, args: &FloodArgs, quiet: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("flood");
    let base = server.base();
    // No server CPU per message here: the flood's own traffic is in the
    // same window, so the figure would not be per ordinary message.
    let target = Target {
        pid: None,
        ..Target::courier(server)
    };
    let pairs = make_pairs(&target, args.pairs, quiet).await?;
    let abusers = client::register_many(&base, args.flooders + 1, 16, None).await?;
    let (sink, flooders) = abusers.split_first().context("no sink account")?;
    let cfg = StepConfig {
        rate: args.rate,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::ZERO,
        size: 256,
        grace: Duration::from_secs(10),
        quiet,
        window: None,
    };

    let baseline = run_step(&target, &pairs, &cfg).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = async {
        let ws = flooders
            .iter()
            .map(|f| flood_sends(server, f, sink, args.in_flight, stop.clone()));
        let http = (0..args.oversize).map(|_| flood_oversize(&base, flooders, sink, stop.clone()));
        let (ws, http) = tokio::join!(
            futures_util::future::join_all(ws),
            futures_util::future::join_all(http)
        );
        let mut sends = FloodTally::default();
        ws.into_iter().for_each(|t| sends.add(t));
        let mut oversize = FloodTally::default();
        http.into_iter().for_each(|t| oversize.add(t));
        (sends, oversize)
    };
    let relay = async {
        let step = run_step(&target, &pairs, &cfg).await;
        stop.store(true, Ordering::Relaxed);
        step
    };
    let (under_flood, (sends, oversize)) = tokio::join!(relay, flood);

    for (phase, step) in [("baseline", &baseline), ("flood", &under_flood)] {
        report.row(
            &format!("{phase} ordinary"),
            format!(
                "{} delivered, delivery p50 {:.2} / p99 {:.2} ms, answer p99 {:.2} ms",
                step.received_live + step.recovered_from_mailbox,
                step.delivery_latency.ms(0.50),
                step.delivery_latency.ms(0.99),
                step.answer_latency.ms(0.99),
            ),
        );
        ordinary_checks(phase, step, &mut report);
    }
    report.row(
        "flood sends",
        format!(
            "{} sent by {} accounts: {} answered 200, {} answered 429, other {:?}",
            sends.sends,
            flooders.len(),
            sends.count(200),
            sends.count(429),
            sends
                .statuses
                .iter()
                .filter(|(s, _)| !matches!(**s, 200 | 429))
                .collect::<BTreeMap<_, _>>(),
        ),
    );
    report.row(
        "oversize",
        format!(
            "{} sent: {} answered 413, other {:?}",
            oversize.sends,
            oversize.count(413),
            oversize
                .statuses
                .iter()
                .filter(|(s, _)| **s != 413)
                .collect::<BTreeMap<_, _>>(),
        ),
    );
    if sends.count(429) == 0 {
        report.fail("no flooded send was refused with 429: the send limit did not hold");
    }
    if oversize.sends == 0 || oversize.count(413) != oversize.sends {
        report.fail(format!(
            "{} of {} oversize messages were answered other than 413",
            oversize.sends - oversize.count(413),
            oversize.sends
        ));
    }
    let server_errors = sends.server_errors() + oversize.server_errors();
    if server_errors > 0 {
        report.fail(format!("{server_errors} 5xx answers to the flood"));
    }
    let ratio = |q: f64| {
        let b = baseline.delivery_latency.ms(q);
        (b > 0.0).then(|| under_flood.delivery_latency.ms(q) / b)
    };
    report.row(
        "p99 under flood",
        ratio(0.99).map_or("n/a".into(), |r| format!("{r:.2}× the baseline")),
    );
    report.fig(
        "flood",
        json!({
            "baseline": baseline.json(),
            "under_flood": under_flood.json(),
            "flood_sends": {"sent": sends.sends, "statuses": sends.statuses,
                            "transport_errors": sends.transport_errors},
            "oversize": {"sent": oversize.sends, "statuses": oversize.statuses,
                         "transport_errors": oversize.transport_errors},
            "send_limit_per_s": args.send_limit,
        }),
    );
    Ok(report)
}

/// An ordinary user must not notice the abuse: no error, no loss, no reorder.
fn ordinary_checks(phase: &str, step: &StepResult, report: &mut Report) {
    for f in step.correctness_failures() {
        report.fail(format!("{phase}: {f}"));
    }
    if step.errors() > 0 {
        report.fail(format!(
            "{phase}: ordinary users got {} errors ({:?})",
            step.errors(),
            step.error_answers
        ));
    }
}

/// One flooder: pipelines sends to `sink` over its WebSocket, `in_flight`
/// unanswered at a time, until `stop`.
async fn flood_sends(
    server: &Courier,
    from: &Device,
    sink: &Device,
    in_flight: usize,
    stop: Arc<AtomicBool>,
) -> FloodTally {
    let mut tally = FloodTally::default();
    let Ok(mut ws) = client::connect(server.addr, from, None).await else {
        tally.transport_errors += 1;
        return tally;
    };
    if drain_until_queue_empty(&mut ws, client::IO_TIMEOUT, None)
        .await
        .is_err()
    {
        tally.transport_errors += 1;
        return tally;
    }
    let content = B64.encode([0u8; 64]);
    let (mut next_id, mut outstanding) = (0u64, 0usize);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && outstanding == 0 {
            break;
        }
        if !stopping && outstanding < in_flight {
            let frame = client::send_frame(next_id, sink, client::epoch_ms(), &content);
            if ws.send(Message::Text(frame)).await.is_err() {
                tally.transport_errors += 1;
                break;
            }
            next_id += 1;
            outstanding += 1;
            tally.sends += 1;
            continue;
        }
        match tokio::time::timeout(client::IO_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                if let Ok(frame) = ServerFrame::parse(&text) {
                    if frame.op == "response" {
                        outstanding = outstanding.saturating_sub(1);
                        *tally.statuses.entry(frame.status.unwrap_or(0)).or_default() += 1;
                    }
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => {
                tally.transport_errors += 1;
                break;
            }
        }
    }
    close_quietly(ws).await;
    tally
}

/// One abusive HTTP client: PUTs messages just over the 256 KiB content
/// limit, as fast as they are answered, until `stop`.
async fn flood_oversize(
    base: &str,
    accounts: &[Device],
    sink: &Device,
    stop: Arc<AtomicBool>,
) -> FloodTally {
    let mut tally = FloodTally::default();
    let http = client::http_client();
    let content = B64.encode(vec![0u8; 256 * 1024 + 1]);
    let body = json!({
        "timestamp": client::epoch_ms(),
        "messages": [{"destinationDeviceId": 1,
                      "destinationRegistrationId": sink.registration_id,
                      "type": 1, "content": content}],
    })
    .to_string();
    let url = format!("{base}/v1/messages/{}", sink.uuid);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let Some(from) = accounts.get(i % accounts.len().max(1)) else {
            break;
        };
        i += 1;
        tally.sends += 1;
        match http
            .put(&url)
            .header("Authorization", from.basic_auth())
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
        {
            Ok(resp) => *tally.statuses.entry(resp.status().as_u16()).or_default() += 1,
            Err(_) => tally.transport_errors += 1,
        }
    }
    tally
}
