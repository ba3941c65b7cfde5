//! `spill`: the store-and-forward path, when recipients are offline.
//!
//! K recipients never connect while a few senders (WebSocket send frames,
//! many in flight each) send M messages round-robin to them. Every answer
//! must be `queued`: with the recipient offline, the SPEC answers only once
//! the copy is committed to its mailbox, so M / wall time is the mailbox
//! commit rate — the durable-write throughput of the server and database.
//!
//! Then (unless `--no-drain`) the drain: all recipients connect at once,
//! read their mailbox up to `queue-empty` and ack every envelope. The
//! drained msg/s counts up to the last `queue-empty` (everything pushed,
//! every ack written; courier deletes acked copies asynchronously). Checked:
//! every committed message came back (distinct guids = answered sends, every
//! stamp present, each at the right recipient), and a final reconnect finds
//! nothing pushed again although it was acked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{
    self, close_quietly, send_frame, Answer, Device, PayloadMaker, ServerFrame, Stamp, Ws,
};
use crate::stats::{per_sec, round1, Latency, Progress, Report};

mod drain;

#[derive(clap::Args, Clone, Debug)]
pub struct SpillArgs {
    /// Messages to send in total.
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    /// Offline recipients the messages are spread over.
    #[arg(long, default_value_t = 100)]
    pub recipients: usize,
    /// Sending WebSocket connections.
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Unanswered sends each sender keeps in flight.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Content bytes per message.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Only fill the mailboxes; do not drain them.
    #[arg(long)]
    pub no_drain: bool,
    /// Upper bound on each phase (seconds).
    #[arg(long, default_value_t = 600.0)]
    pub timeout_secs: f64,
}

/// A stamp's run number for spill traffic (relay runs count up from 1).
pub(crate) const SPILL_RUN: u32 = 0x5350_494c;

/// Silence on a sender for this long ends it (the server stopped answering).
const IDLE: Duration = Duration::from_secs(30);

pub(crate) struct SenderOut {
    /// Global message indices answered `queued`.
    pub queued: Vec<u64>,
    pub delivered: u64,
    pub other_ok: u64,
    pub errors: BTreeMap<u16, u64>,
    pub unanswered: u64,
    pub latency: Latency,
    pub last_answer: Option<Instant>,
    pub error: Option<String>,
}

pub async fn run(
    base: &str,
    addr: std::net::SocketAddr,
    args: &SpillArgs,
    quiet: bool,
) -> anyhow::Result<Report> {
    let mut report = Report::new("spill");
    if args.messages == 0 || args.messages > 100_000_000 {
        anyhow::bail!("--messages must be in 1..=100000000");
    }
    if args.recipients == 0 || args.senders == 0 || args.in_flight == 0 {
        anyhow::bail!("--recipients, --senders and --in-flight must be positive");
    }
    if !(args.timeout_secs.is_finite() && args.timeout_secs > 0.0) {
        anyhow::bail!("--timeout-secs must be positive");
    }
    let timeout = Duration::from_secs_f64(args.timeout_secs.min(86_400.0));
    let (m, k, s) = (args.messages, args.recipients, args.senders);

    let devices = {
        let progress = Progress::new("register", &["accounts"], 0);
        let _line = progress.report_every_second(quiet);
        client::register_many(base, k + s, 32, Some(progress.counter(0))).await?
    };
    let (recipients, senders) = devices.split_at(k);
    let recipients: Arc<Vec<Device>> = Arc::new(recipients.to_vec());

    let sockets = client::connect_all(addr, senders).await?;

    // ---- fill ----
    let progress = Progress::new("spill", &["sent", "queued", "other"], 1);
    let payload = Arc::new(PayloadMaker::new(args.size));
    let start = Instant::now();
    let deadline = start + timeout;
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            tokio::spawn(send_all(
                ws,
                i as u64,
                s as u64,
                m,
                recipients.clone(),
                args.in_flight,
                payload.clone(),
                progress.clone(),
                start,
                deadline,
            ))
        })
        .collect();
    let line = progress.report_every_second(quiet);
    let mut outs = Vec::new();
    let mut failures = 0;
    for t in tasks {
        match t.await {
            Ok(o) => outs.push(o),
            Err(_) => failures += 1,
        }
    }
    drop(line);
    let last_answer = outs
        .iter()
        .filter_map(|o| o.last_answer)
        .max()
        .unwrap_or(start);
    let fill_time = last_answer.saturating_duration_since(start);

    let mut queued = vec![false; m as usize];
    let mut n_queued = 0u64;
    let mut latency = Latency::new();
    let (mut delivered, mut other_ok, mut unanswered) = (0u64, 0u64, 0u64);
    let mut errors: BTreeMap<u16, u64> = BTreeMap::new();
    let mut transport = Vec::new();
    for o in &outs {
        for &j in &o.queued {
            queued[j as usize] = true;
        }
        n_queued += o.queued.len() as u64;
        latency.merge(&o.latency);
        delivered += o.delivered;
        other_ok += o.other_ok;
        unanswered += o.unanswered;
        for (code, n) in &o.errors {
            *errors.entry(*code).or_default() += n;
        }
        if let Some(e) = &o.error {
            transport.push(e.clone());
        }
    }
    let commit_rate = per_sec(n_queued, fill_time);
    report.row(
        "sizes",
        format!(
            "{m} messages of {} B to {k} offline recipients, {s} senders × {} in flight",
            args.size.max(client::STAMP_LEN),
            args.in_flight
        ),
    );
    report.row(
        "fill",
        format!("{n_queued} queued in {:.2} s", fill_time.as_secs_f64()),
    );
    report.row("mailbox commits", format!("{commit_rate:.0} msg/s"));
    report.row(
        "answers",
        format!(
            "queued {n_queued}, delivered {delivered}, other {other_ok}, errors {errors:?}, unanswered {unanswered}"
        ),
    );
    report.row("answer latency", latency.summary());
    let mut figures = json!({
        "messages": m,
        "recipients": k,
        "senders": s,
        "in_flight": args.in_flight,
        "size": args.size.max(client::STAMP_LEN),
        "fill_s": fill_time.as_secs_f64(),
        "commit_rate": round1(commit_rate),
        "answers": {
            "queued": n_queued,
            "delivered": delivered,
            "other_ok": other_ok,
            "errors": errors.iter().map(|(c, n)| (c.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "unanswered": unanswered,
        },
        "answer_latency": latency.json(),
        "transport_errors": transport.len() + failures,
    });
    if n_queued != m {
        report.fail(format!(
            "{} of {m} sends were not answered `queued` (delivered {delivered}, other {other_ok}, errors {errors:?}, unanswered {unanswered})",
            m - n_queued
        ));
    }
    for e in transport.iter().take(3) {
        report.fail(format!("sender: {e}"));
    }
    if failures > 0 {
        report.fail(format!("{failures} sender tasks panicked"));
    }

    // ---- drain ----
    if !args.no_drain {
        drain::drain(
            addr,
            &recipients,
            &queued,
            n_queued,
            timeout,
            quiet,
            &mut report,
            &mut figures,
        )
        .await;
    }
    if let serde_json::Value::Object(map) = figures {
        report.figures.extend(map);
    }
    Ok(report)
}

/// One sender: messages `index, index + stride, …` below `total`, each to
/// recipient `j % K`, at most `in_flight` unanswered. Progress counters:
/// 0 sent, 1 queued, 2 anything else. (`unacked-replay` fills its mailbox
/// with it too.)
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_all(
    ws: Ws,
    index: u64,
    stride: u64,
    total: u64,
    recipients: Arc<Vec<Device>>,
    in_flight: usize,
    payload: Arc<PayloadMaker>,
    progress: Arc<Progress>,
    start: Instant,
    deadline: Instant,
) -> SenderOut {
    let count = if total > index {
        (total - index).div_ceil(stride)
    } else {
        0
    };
    let (mut sink, mut stream) = ws.split();
    let window = Semaphore::new(in_flight);
    let sent_at: Vec<AtomicU64> = (0..count).map(|_| AtomicU64::new(0)).collect();

    let writer = async {
        for local in 0..count {
            match window.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => return Some("window closed".to_owned()),
            }
            if Instant::now() >= deadline {
                return Some("deadline".to_owned());
            }
            let j = index + local * stride;
            let to = &recipients[(j % recipients.len() as u64) as usize];
            let now_ns = start.elapsed().as_nanos() as u64;
            let content = payload.content(Stamp {
                run: SPILL_RUN,
                stream: index as u32,
                seq: j,
                sent_ns: now_ns,
            });
            sent_at[local as usize].store(now_ns, Ordering::Relaxed);
            let frame = send_frame(local, to, client::epoch_ms(), &content);
            if let Err(e) = sink.feed(Message::Text(frame)).await {
                return Some(format!("write: {e}"));
            }
            progress.add(0, 1);
            if window.available_permits() == 0 || local + 1 == count {
                if let Err(e) = sink.flush().await {
                    return Some(format!("flush: {e}"));
                }
            }
        }
        None
    };

    let reader = async {
        let mut out = SenderOut {
            queued: Vec::with_capacity(count as usize),
            delivered: 0,
            other_ok: 0,
            errors: BTreeMap::new(),
            unanswered: 0,
            latency: Latency::new(),
            last_answer: None,
            error: None,
        };
        let mut answered = vec![false; count as usize];
        let mut n = 0u64;
        while n < count {
            let wait = IDLE.min(deadline.saturating_duration_since(Instant::now()));
            let msg = match tokio::time::timeout(wait, stream.next()).await {
                Err(_) => {
                    out.error = Some(format!("no answer for {wait:?}"));
                    break;
                }
                Ok(None) => {
                    out.error = Some("connection closed".into());
                    break;
                }
                Ok(Some(Err(e))) => {
                    out.error = Some(format!("read: {e}"));
                    break;
                }
                Ok(Some(Ok(m))) => m,
            };
            let Message::Text(text) = msg else { continue };
            let Ok(frame) = ServerFrame::parse(&text) else {
                continue;
            };
            let Some(id) = frame.id.filter(|&id| frame.op == "response" && id < count) else {
                continue;
            };
            if std::mem::replace(&mut answered[id as usize], true) {
                continue;
            }
            n += 1;
            window.add_permits(1);
            let now = Instant::now();
            out.last_answer = Some(now);
            let at = sent_at[id as usize].load(Ordering::Relaxed);
            out.latency
                .record_us(((now - start).as_nanos() as u64).saturating_sub(at) / 1000);
            match frame.answer() {
                Answer::Queued => {
                    out.queued.push(index + id * stride);
                    progress.add(1, 1);
                }
                Answer::Delivered => {
                    out.delivered += 1;
                    progress.add(2, 1);
                }
                Answer::OtherOk => {
                    out.other_ok += 1;
                    progress.add(2, 1);
                }
                Answer::Error(code) => {
                    *out.errors.entry(code).or_default() += 1;
                    progress.add(2, 1);
                }
            }
        }
        // Unblock a writer waiting for window space if answers stopped.
        window.close();
        out.unanswered = count - n;
        out
    };

    let (write_error, mut out) = tokio::join!(writer, reader);
    if out.error.is_none() {
        out.error = write_error.filter(|e| e != "window closed");
    }
    if let Ok(ws) = sink.reunite(stream) {
        close_quietly(ws).await;
    }
    out
}
