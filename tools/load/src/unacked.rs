//! `unacked-replay`: reading a large mailbox without acking must not grow
//! the server's memory with the mailbox.
//!
//! M messages of `--size` bytes are queued for device B while it is offline
//! (WebSocket sends, as in `spill`). Then B connects and reads for
//! `--read-secs` without acking anything: courier may push at most 1,000
//! copies and 16 MiB of content ahead of the acks, so the replay must
//! pause. The tool counts what arrived and samples the server's RSS
//! (`/proc/PID/status`, every 100 ms) meanwhile. Then it acks what it got,
//! and everything else as it comes, up to `queue-empty`.
//!
//! Fails when more than 1,000 envelopes or more than 16 MiB of (decoded)
//! content arrive before the first ack, when `queue-empty` never comes, or
//! when a queued message is missing from the replay.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{
    self, ack_frame, close_quietly, drain_until_queue_empty, Device, PayloadMaker, ServerFrame,
};
use crate::server::{Courier, RssPeak};
use crate::spill::{send_all, SPILL_RUN};
use crate::stats::{per_sec, round1, round3, Progress, Report};

/// What courier may push to one connection ahead of its acks (SPEC,
/// "Bounded waiting for acks").
pub const MAX_UNACKED_COPIES: u64 = 1_000;
pub const MAX_UNACKED_BYTES: u64 = 16 * 1024 * 1024;

/// How often the server's RSS is sampled.
const RSS_EVERY: Duration = Duration::from_millis(100);

#[derive(clap::Args, Clone, Debug)]
pub struct UnackedArgs {
    /// Messages queued for the offline device.
    #[arg(long, default_value_t = 2_000)]
    pub messages: u64,
    /// Content bytes per message (24..=262144).
    #[arg(long, default_value_t = 100 * 1024)]
    pub size: usize,
    /// Seconds the device reads without acking.
    #[arg(long, default_value_t = 3.0)]
    pub read_secs: f64,
    /// Sending WebSocket connections that fill the mailbox.
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Unanswered sends each sender keeps in flight.
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// Upper bound on the fill and on the acked read (seconds each).
    #[arg(long, default_value_t = 600.0)]
    pub timeout_secs: f64,
}

pub async fn run(server: &Courier, args: &UnackedArgs, quiet: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("unacked-replay");
    let m = args.messages;
    if m == 0 || m > 10_000_000 {
        bail!("--messages must be in 1..=10000000");
    }
    if !(client::STAMP_LEN..=256 * 1024).contains(&args.size) {
        bail!("--size must be in 24..=262144 (the content limit is 256 KiB)");
    }
    if args.senders == 0 || args.in_flight == 0 {
        bail!("--senders and --in-flight must be positive");
    }
    if !(args.read_secs.is_finite() && (0.1..=600.0).contains(&args.read_secs)) {
        bail!("--read-secs must be in 0.1..=600");
    }
    if !(args.timeout_secs.is_finite() && args.timeout_secs > 0.0) {
        bail!("--timeout-secs must be positive");
    }
    let timeout = Duration::from_secs_f64(args.timeout_secs.min(86_400.0));
    let base = server.base();
    let addr = server.addr;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let kib_mib = |k: Option<u64>| {
        k.map_or("n/a (pass --server-pid)".to_owned(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };

    let devices = client::register_many(&base, 1 + args.senders, 8, None).await?;
    let (b, senders) = devices.split_first().expect("1 + senders devices");
    let recipients: Arc<Vec<Device>> = Arc::new(vec![b.clone()]);
    let rss_start = server.rss_kib();

    // ---- fill B's mailbox ----
    let sockets = client::connect_all(addr, senders).await?;
    let progress = Progress::new("fill", &["sent", "queued", "other"], 1);
    let payload = Arc::new(PayloadMaker::new(args.size));
    let start = Instant::now();
    let s = sockets.len() as u64;
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            tokio::spawn(send_all(
                ws,
                i as u64,
                s,
                m,
                recipients.clone(),
                args.in_flight,
                payload.clone(),
                progress.clone(),
                start,
                start + timeout,
            ))
        })
        .collect();
    let line = progress.report_every_second(quiet);
    let mut n_queued = 0u64;
    let mut not_queued = 0u64;
    let mut fill_errors = Vec::new();
    let mut last_answer = start;
    for t in tasks {
        match t.await {
            Ok(o) => {
                last_answer = last_answer.max(o.last_answer.unwrap_or(start));
                n_queued += o.queued.len() as u64;
                not_queued +=
                    o.delivered + o.other_ok + o.unanswered + o.errors.values().sum::<u64>();
                fill_errors.extend(o.error);
            }
            Err(e) => fill_errors.push(format!("sender task: {e}")),
        }
    }
    // Up to the last answer: the senders' closing handshakes are no part of it.
    let fill_time = last_answer.saturating_duration_since(start);
    drop(line);
    drop(payload);
    report.row(
        "sizes",
        format!(
            "{m} messages of {} B ({:.1} MiB of content) for one offline device",
            args.size,
            mib(m * args.size as u64)
        ),
    );
    report.row(
        "fill",
        format!(
            "{n_queued} queued in {:.2} s ({:.0} msg/s, {:.1} MiB/s), {not_queued} not queued",
            fill_time.as_secs_f64(),
            per_sec(n_queued, fill_time),
            mib(n_queued * args.size as u64) / fill_time.as_secs_f64().max(1e-9)
        ),
    );
    for e in fill_errors.iter().take(3) {
        report.fail(format!("fill: {e}"));
    }
    if n_queued != m {
        report.fail(format!(
            "{} of {m} sends were not answered `queued`",
            m - n_queued
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_filled = server.rss_kib();

    // ---- B reads without acking ----
    if !quiet {
        eprintln!(
            "courier-load: unacked-replay: B connects and reads for {} s without acking",
            args.read_secs
        );
    }
    let sampler = server.rss_sampler(RSS_EVERY);
    let connected = Instant::now();
    let mut ws = client::connect(addr, b, None).await?;
    let read_until = Instant::now() + Duration::from_secs_f64(args.read_secs);
    let mut unacked: Vec<String> = Vec::new();
    let (mut unacked_bytes, mut unacked_wire) = (0u64, 0u64);
    let mut seen = vec![false; m as usize];
    let mut guids: HashSet<String> = HashSet::new();
    let (mut duplicates, mut foreign) = (0u64, 0u64);
    let mut last_unacked_at: Option<Duration> = None;
    let mut queue_empty_at: Option<Duration> = None;
    let mut broken: Option<String> = None;
    let mut note = |stamp: Option<client::Stamp>, guid: &str, guids: &mut HashSet<String>| {
        if !guids.insert(guid.to_owned()) {
            duplicates += 1;
        }
        match stamp {
            Some(s) if s.run == SPILL_RUN && s.seq < m => seen[s.seq as usize] = true,
            _ => foreign += 1,
        }
    };
    loop {
        let left = read_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let msg = match tokio::time::timeout(left, ws.next()).await {
            Err(_) => break,
            Ok(None) => {
                broken = Some("connection closed".into());
                break;
            }
            Ok(Some(Err(e))) => {
                broken = Some(format!("read: {e}"));
                break;
            }
            Ok(Some(Ok(msg))) => msg,
        };
        match msg {
            Message::Text(text) => {
                let frame = ServerFrame::parse(&text)?;
                match frame.op.as_ref() {
                    "message" => {
                        if let Some(env) = frame.envelope {
                            unacked_bytes += client::decoded_len(&env.content) as u64;
                            unacked_wire += text.len() as u64;
                            note(client::read_stamp(&env.content), &env.guid, &mut guids);
                            unacked.push(env.guid.into_owned());
                            last_unacked_at = Some(connected.elapsed());
                        }
                    }
                    "queue-empty" => {
                        queue_empty_at = Some(connected.elapsed());
                        break;
                    }
                    _ => {}
                }
            }
            Message::Close(c) => {
                broken = Some(format!("server closed: {c:?}"));
                break;
            }
            _ => {}
        }
    }
    let unacked_peak = match sampler {
        Some(s) => Some(s.stop().await),
        None => None,
    };
    let n_unacked = unacked.len() as u64;
    let bound = MAX_UNACKED_COPIES.min(MAX_UNACKED_BYTES / args.size as u64);
    report.row(
        "rss after fill",
        format!("{} (at start {})", kib_mib(rss_filled), kib_mib(rss_start)),
    );
    report.row(
        "before any ack",
        format!(
            "{n_unacked} envelopes, {:.2} MiB of content ({:.2} MiB of frames) in {:.1} s; the last at {}; bound for this size {bound} envelopes",
            mib(unacked_bytes),
            mib(unacked_wire),
            args.read_secs,
            last_unacked_at.map_or("-".to_owned(), |d| format!("{:.3} s", d.as_secs_f64())),
        ),
    );
    report.row("rss while unacked", peak_text(unacked_peak));
    if n_unacked > MAX_UNACKED_COPIES {
        report.fail(format!(
            "{n_unacked} envelopes arrived before any ack (at most {MAX_UNACKED_COPIES} may)"
        ));
    }
    if unacked_bytes > MAX_UNACKED_BYTES {
        report.fail(format!(
            "{unacked_bytes} bytes of content arrived before any ack (at most {MAX_UNACKED_BYTES} may)"
        ));
    }
    if queue_empty_at.is_none() && broken.is_none() && n_unacked < bound.min(m) {
        report.warn(format!(
            "only {n_unacked} envelopes arrived in {} s without acks although {} may",
            args.read_secs,
            bound.min(m)
        ));
    }

    // ---- ack what came, and everything else as it comes ----
    let sampler = server.rss_sampler(RSS_EVERY);
    let acking = Instant::now();
    let progress = Progress::new("acked read", &["envelopes"], 0);
    progress.add(0, n_unacked);
    let line = progress.report_every_second(quiet);
    let mut rest_count = 0u64;
    if let Some(why) = &broken {
        report.fail(format!("the connection ended before any ack: {why}"));
    } else {
        let acked_read = async {
            for g in &unacked {
                ws.feed(Message::Text(ack_frame(g))).await?;
            }
            ws.flush().await?;
            if queue_empty_at.is_some() {
                return anyhow::Ok(Vec::new());
            }
            drain_until_queue_empty(&mut ws, client::IO_TIMEOUT, Some(progress.counter(0))).await
        };
        match tokio::time::timeout(timeout, acked_read).await {
            Err(_) => report.fail(format!("no queue-empty within {timeout:?}")),
            Ok(Err(e)) => report.fail(format!("no queue-empty: {e:#}")),
            Ok(Ok(rest)) => {
                if queue_empty_at.is_none() {
                    queue_empty_at = Some(connected.elapsed());
                }
                rest_count = rest.len() as u64;
                for p in rest {
                    note(p.stamp, &p.guid, &mut guids);
                }
            }
        }
    }
    let acked_time = acking.elapsed();
    drop(line);
    let acked_peak = match sampler {
        Some(s) => Some(s.stop().await),
        None => None,
    };
    close_quietly(ws).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = server.rss_kib();

    let missing = (0..m as usize).filter(|&i| !seen[i]).count() as u64;
    let total = n_unacked + rest_count;
    report.row(
        "acked read",
        format!(
            "{rest_count} more envelopes in {:.2} s after the first ack ({:.0} msg/s, {:.1} MiB/s)",
            acked_time.as_secs_f64(),
            per_sec(rest_count, acked_time),
            mib(rest_count * args.size as u64) / acked_time.as_secs_f64().max(1e-9)
        ),
    );
    report.row(
        "queue-empty",
        queue_empty_at.map_or("never".to_owned(), |d| {
            format!("{:.2} s after connecting", d.as_secs_f64())
        }),
    );
    report.row("rss while acking", peak_text(acked_peak));
    report.row("rss after", kib_mib(rss_after));
    report.row(
        "check",
        format!(
            "{total} envelopes, {} distinct guids of {m} queued, missing {missing}, duplicate guids {duplicates}, foreign {foreign}",
            guids.len()
        ),
    );
    if queue_empty_at.is_some() && missing > 0 {
        report.fail(format!("{missing} queued messages never came back"));
    }

    // Everything was acked: a fresh connection should find the mailbox empty.
    let left_after_ack = if queue_empty_at.is_some() {
        let again = async {
            let mut ws = client::connect(addr, b, None).await?;
            let pushed = drain_until_queue_empty(&mut ws, client::IO_TIMEOUT, None).await?;
            close_quietly(ws).await;
            anyhow::Ok(pushed.len())
        };
        let left = tokio::time::timeout(client::IO_TIMEOUT, again)
            .await
            .ok()
            .and_then(Result::ok);
        report.row(
            "left after ack",
            left.map_or("reconnect failed".to_owned(), |n| {
                format!("{n} envelopes pushed again on reconnect")
            }),
        );
        if left.is_some_and(|n| n > 0) {
            report.warn(format!(
                "{} acked messages were pushed again on a later connection",
                left.unwrap_or(0)
            ));
        }
        left
    } else {
        None
    };

    let peak_json = |p: Option<RssPeak>| {
        p.map(|p| json!({"max_kib": p.max_kib, "last_kib": p.last_kib, "samples": p.samples}))
    };
    report.fig("messages", m);
    report.fig("size", args.size);
    report.fig("read_secs", args.read_secs);
    report.fig("fill_s", round3(fill_time.as_secs_f64()));
    report.fig("queued", n_queued);
    report.fig(
        "unacked",
        json!({
            "envelopes": n_unacked,
            "content_bytes": unacked_bytes,
            "frame_bytes": unacked_wire,
            "last_at_s": last_unacked_at.map(|d| round3(d.as_secs_f64())),
            "bound": bound,
        }),
    );
    report.fig("acked_read_s", round3(acked_time.as_secs_f64()));
    report.fig("acked_read_rate", round1(per_sec(rest_count, acked_time)));
    report.fig(
        "queue_empty_s",
        queue_empty_at.map(|d| round3(d.as_secs_f64())),
    );
    report.fig("envelopes", total);
    report.fig("distinct_guids", guids.len());
    report.fig("missing", missing);
    report.fig("duplicate_guids", duplicates);
    report.fig("foreign", foreign);
    report.fig("left_after_ack", left_after_ack);
    report.fig(
        "rss_kib",
        json!({
            "start": rss_start,
            "filled": rss_filled,
            "unacked": peak_json(unacked_peak),
            "acking": peak_json(acked_peak),
            "after": rss_after,
        }),
    );
    Ok(report)
}

fn peak_text(p: Option<RssPeak>) -> String {
    match p {
        Some(p) if p.samples > 0 => format!(
            "peak {:.1} MiB, last {:.1} MiB ({} samples)",
            p.max_kib as f64 / 1024.0,
            p.last_kib as f64 / 1024.0,
            p.samples
        ),
        _ => "n/a (pass --server-pid)".to_owned(),
    }
}
