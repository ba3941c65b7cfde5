//! `stalled`: a receiver whose connection stops reading must hold nobody up.
//!
//! Device B opens its WebSocket by hand on a socket with a small receive
//! buffer (`--rcvbuf`, set before connecting), reads the `101` head and
//! never reads again. Device A then sends N large messages to B over HTTP,
//! all at once. Courier pushes them live to B's connection, where they can
//! only pile up; after the ack timeout (the tool starts its server with
//! `COURIER_ACK_TIMEOUT_MS=--ack-timeout-ms`) they must be stored in the
//! mailbox and every sender answered `queued`. Then B connects normally:
//! the new connection must replace the stalled one at once and get the
//! whole mailbox, then `queue-empty`. Last, the tool reads what the stalled
//! connection was sent, to see how it ended (`4409`, or a reset).
//!
//! `--waves K` sends N messages K times, each wave once the previous one is
//! answered. Expired copies free the held-copy bound, so later waves are
//! pushed to the stalled connection again, and with enough of them (e.g.
//! `--messages 150 --waves 2`) the output waiting for it passes 32 MiB and
//! the server must reset it (reported, not judged).
//!
//! With `--replace-after-ms` B connects again that soon after the sends
//! begin, while the stalled connection still holds their copies: the
//! replaced connection's copies must go to the mailbox at once (answered
//! `queued`, pushed before `queue-empty`); a send routed after the
//! replacement may be answered `delivered` by the new connection instead.
//!
//! Fails when a send is not answered within `--answer-limit-secs` (10 s),
//! one is answered other than `queued`, the new connection's `queue-empty`
//! takes over `--queue-empty-limit-secs` (5 s) or never comes, or an
//! answered guid is missing before it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::client::{
    self, ack_frame, close_quietly, drain_until_queue_empty, Device, PayloadMaker, Pushed,
    ServerFrame, Stamp, Ws,
};
use crate::server::Courier;
use crate::stats::{round3, Latency, Report};

#[derive(clap::Args, Clone, Debug)]
pub struct StalledArgs {
    /// Messages A sends to B over HTTP, all at once (per wave).
    #[arg(long, default_value_t = 40)]
    pub messages: usize,
    /// Content bytes per message (24..=262144).
    #[arg(long, default_value_t = 150 * 1024)]
    pub size: usize,
    /// SO_RCVBUF of the stalled connection's socket, in bytes (Linux doubles it).
    #[arg(long, default_value_t = 4096)]
    pub rcvbuf: u32,
    /// COURIER_ACK_TIMEOUT_MS of the server the tool starts (not applied with --server).
    #[arg(long, default_value_t = 1000)]
    pub ack_timeout_ms: u64,
    /// Fail if a send is not answered within this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub answer_limit_secs: f64,
    /// Fail if the new connection's `queue-empty` takes longer than this (seconds).
    #[arg(long, default_value_t = 5.0)]
    pub queue_empty_limit_secs: f64,
    /// Send --messages this many times, each wave once the previous one is
    /// answered (enough of them pass the 32 MiB of output after which the
    /// server resets the stalled connection).
    #[arg(long, default_value_t = 1)]
    pub waves: usize,
    /// Connect B again this long after the sends begin, while the stalled
    /// connection still holds their copies [default: once all are answered].
    /// Sends may then be answered `delivered` by the new connection.
    #[arg(long)]
    pub replace_after_ms: Option<u64>,
}

/// A stamp's run number for this scenario's messages.
const STALLED_RUN: u32 = 0x5354_4c4c;

/// How long the tool waits for the stalled connection to end, at the end.
const AFTERMATH_WAIT: Duration = Duration::from_secs(5);

/// `ack_timeout_ms`: what the tool set on the server it started, `None` for
/// a server it did not start (or started without setting it, as `smoke`).
pub async fn run(
    server: &Courier,
    args: &StalledArgs,
    ack_timeout_ms: Option<u64>,
    quiet: bool,
) -> anyhow::Result<Report> {
    let mut report = Report::new("stalled");
    let n = args.messages;
    if n == 0 || n > 10_000 {
        bail!("--messages must be in 1..=10000");
    }
    if args.waves == 0 || args.waves > 100 {
        bail!("--waves must be in 1..=100");
    }
    if !(client::STAMP_LEN..=256 * 1024).contains(&args.size) {
        bail!("--size must be in 24..=262144 (the content limit is 256 KiB)");
    }
    for (name, v) in [
        ("--answer-limit-secs", args.answer_limit_secs),
        ("--queue-empty-limit-secs", args.queue_empty_limit_secs),
    ] {
        if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
            bail!("{name} must be in (0, 3600]");
        }
    }
    let answer_limit = Duration::from_secs_f64(args.answer_limit_secs);
    let queue_empty_limit = Duration::from_secs_f64(args.queue_empty_limit_secs);
    let base = server.base();
    let addr = server.addr;

    let devices = client::register_many(&base, 2, 2, None).await?;
    let (a, b) = (&devices[0], &devices[1]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = server.rss_kib();

    // ---- B connects and stops reading ----
    let stalled = tokio::time::timeout(
        client::IO_TIMEOUT,
        client::connect_stalled(addr, b, args.rcvbuf),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("stalled connection: no 101 in time")))
    .context("B's stalled connection")?;
    // Its session goes live once the empty mailbox is replayed; wait for the
    // `queue-empty` to be in the socket's buffer, without reading it, so the
    // sends below are pushed live rather than held back for the replay.
    let live = peek_for(&stalled, b"queue-empty", Duration::from_secs(5)).await;
    if !live {
        report.warn("B's stalled connection had no queue-empty in its buffer after 5 s");
    }
    if !quiet {
        eprintln!(
            "courier-load: stalled: B connected and stopped reading; A sends {} × {n} messages",
            args.waves
        );
    }

    // ---- A sends N messages at once; B connects again ----
    // By default B's new connection starts once every send is answered; with
    // --replace-after-ms it starts that long after the sends, while the
    // stalled connection still holds their copies.
    let http = client::http_client();
    let payload = PayloadMaker::new(args.size);
    let waves = args.waves as u64;
    let (done_tx, done_rx) = watch::channel(false);
    let sends = async {
        let mut answers = Vec::with_capacity(n * args.waves);
        for wave in 0..waves {
            let contents: Vec<String> = (0..n as u64)
                .map(|i| {
                    payload.content(Stamp {
                        run: STALLED_RUN,
                        stream: wave as u32,
                        seq: wave * n as u64 + i,
                        sent_ns: 0,
                    })
                })
                .collect();
            let start = Instant::now();
            answers.extend(
                futures_util::future::join_all(contents.iter().map(|content| {
                    let (http, base) = (&http, &base);
                    async move {
                        let r = tokio::time::timeout(
                            answer_limit,
                            client::send_http(http, base, a, b, content),
                        )
                        .await;
                        (r, start.elapsed())
                    }
                }))
                .await,
            );
        }
        let rss = server.rss_kib();
        let _ = done_tx.send(true);
        (answers, rss)
    };
    let replace = async {
        match args.replace_after_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => {
                let _ = done_rx.clone().wait_for(|done| *done).await;
            }
        }
        let t1 = Instant::now();
        let r = tokio::time::timeout(
            client::IO_TIMEOUT,
            replace_connection(addr, b, t1, done_rx.clone()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "no queue-empty (or not every send answered) within {:?}",
                client::IO_TIMEOUT
            ))
        });
        (t1, r)
    };
    let ((answers, rss_stalled), (t1, replaced)) = tokio::join!(sends, replace);
    let mut latency = Latency::new();
    let (mut queued_guids, mut delivered_guids) = (Vec::new(), Vec::new());
    let (mut other, mut unanswered, mut answered) = (0usize, 0usize, 0usize);
    let mut errors: Vec<String> = Vec::new();
    let mut last_answer = Duration::ZERO;
    for (r, at) in answers {
        match r {
            Err(_) => unanswered += 1,
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Ok(Ok(answer)) => {
                answered += 1;
                latency.record(at);
                last_answer = last_answer.max(at);
                match (answer.status, answer.delivery.as_deref(), answer.guid) {
                    (200, Some("queued"), Some(g)) => queued_guids.push(g),
                    (200, Some("delivered"), Some(g)) => delivered_guids.push(g),
                    (200, _, _) => other += 1,
                    (s, _, _) => errors.push(format!(
                        "{s}: {}",
                        answer.error.as_deref().unwrap_or_default()
                    )),
                }
            }
        }
    }
    let (queued, delivered) = (queued_guids.len(), delivered_guids.len());
    let total = n * args.waves;
    report.row(
        "sizes",
        format!(
            "{} × {n} messages of {} B over HTTP to a connection that stopped reading (SO_RCVBUF {} B)",
            args.waves, args.size, args.rcvbuf
        ),
    );
    report.row(
        "ack timeout",
        match ack_timeout_ms {
            Some(ms) => format!("{ms} ms (COURIER_ACK_TIMEOUT_MS)"),
            None => "the server's own setting".to_owned(),
        },
    );
    report.row(
        "new connection from",
        match args.replace_after_ms {
            Some(ms) => format!("{ms} ms after the sends began (copies still held)"),
            None => "after every send was answered".to_owned(),
        },
    );
    report.row(
        "sends answered",
        format!(
            "{answered} of {total}, each within {:.3} s (limit {:.0} s): queued {queued}, delivered {delivered}, other {other}, errors {}, unanswered {unanswered}",
            last_answer.as_secs_f64(),
            answer_limit.as_secs_f64(),
            errors.len()
        ),
    );
    report.row("answer latency", latency.summary());
    if unanswered > 0 {
        report.fail(format!(
            "{unanswered} of {total} sends were not answered within {answer_limit:?}"
        ));
    }
    for e in errors.iter().take(3) {
        report.fail(format!("a send failed: {e}"));
    }
    if other > 0 {
        report.fail(format!(
            "{other} sends were answered 200 with neither `queued` nor `delivered`"
        ));
    }
    if delivered > 0 && args.replace_after_ms.is_none() {
        report.fail(format!(
            "{delivered} sends were answered `delivered`, though nobody read them"
        ));
    }

    let (mut upgrade_s, mut queue_empty_s) = (None, None);
    let mut fresh = None;
    match replaced {
        Err(e) => report.fail(format!("the new connection: {e:#}")),
        Ok(r) => {
            upgrade_s = Some(r.upgraded.as_secs_f64());
            queue_empty_s = Some(r.queue_empty.as_secs_f64());
            let before: HashSet<&str> = r.before.iter().map(|p| p.guid.as_str()).collect();
            let after: HashSet<&str> = r.after.iter().map(String::as_str).collect();
            let missing = queued_guids
                .iter()
                .filter(|g| !before.contains(g.as_str()))
                .count();
            let delivered_unseen = delivered_guids
                .iter()
                .filter(|g| !before.contains(g.as_str()) && !after.contains(g.as_str()))
                .count();
            let foreign = r
                .before
                .iter()
                .filter(|p| p.stamp.is_none_or(|s| s.run != STALLED_RUN))
                .count();
            report.row(
                "new connection",
                format!(
                    "101 after {:.3} s, queue-empty after {:.3} s (limit {:.0} s), {} envelopes before it ({missing} of {queued} queued guids missing), {} after it",
                    r.upgraded.as_secs_f64(),
                    r.queue_empty.as_secs_f64(),
                    queue_empty_limit.as_secs_f64(),
                    r.before.len(),
                    r.after.len(),
                ),
            );
            if r.queue_empty > queue_empty_limit {
                report.fail(format!(
                    "the new connection's queue-empty took {:.3} s (limit {queue_empty_limit:?})",
                    r.queue_empty.as_secs_f64()
                ));
            }
            if missing > 0 {
                report.fail(format!(
                    "{missing} guids answered `queued` did not arrive before queue-empty"
                ));
            }
            if delivered_unseen > 0 {
                report.fail(format!(
                    "{delivered_unseen} guids answered `delivered` never reached the new connection"
                ));
            }
            report.fig("envelopes_before_queue_empty", r.before.len());
            report.fig("envelopes_after_queue_empty", r.after.len());
            report.fig("missing", missing);
            report.fig("foreign", foreign);
            fresh = Some(r.ws);
        }
    }

    // ---- how the stalled connection ended ----
    let aftermath = aftermath(stalled, t1).await;
    report.row("stalled connection", aftermath.to_string());
    if matches!(aftermath.end, End::StillOpen) {
        report.warn(format!(
            "the stalled connection was neither closed nor reset {AFTERMATH_WAIT:?} after the tool started reading it"
        ));
    }
    if let Some(ws) = fresh {
        close_quietly(ws).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = server.rss_kib();

    let mib = |k: Option<u64>| {
        k.map_or("n/a (pass --server-pid)".to_owned(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    report.row(
        "server RSS",
        format!(
            "before {}, when every send was answered {}, at the end {}",
            mib(rss_before),
            mib(rss_stalled),
            mib(rss_after)
        ),
    );
    report.fig("messages", n);
    report.fig("waves", args.waves);
    report.fig("size", args.size);
    report.fig("rcvbuf", args.rcvbuf);
    report.fig("ack_timeout_ms", ack_timeout_ms);
    report.fig("replace_after_ms", args.replace_after_ms);
    report.fig(
        "answers",
        json!({
            "queued": queued, "delivered": delivered, "other_ok": other,
            "errors": errors.len(), "unanswered": unanswered,
        }),
    );
    report.fig("all_answered_s", round3(last_answer.as_secs_f64()));
    report.fig("answer_latency", latency.json());
    report.fig("new_connection_101_s", upgrade_s.map(round3));
    report.fig("new_connection_queue_empty_s", queue_empty_s.map(round3));
    report.fig("stalled_connection", aftermath.json());
    report.fig(
        "rss_kib",
        json!({"before": rss_before, "stalled": rss_stalled, "after": rss_after}),
    );
    Ok(report)
}

/// What B's new connection got.
struct Replaced {
    ws: Ws,
    /// From the connect to the `101`.
    upgraded: Duration,
    /// From the connect to `queue-empty`.
    queue_empty: Duration,
    /// Pushed before `queue-empty`: the mailbox.
    before: Vec<Pushed>,
    /// Guids pushed after it (live), until every send was answered.
    after: Vec<String>,
}

/// B connects normally, reads and acks its mailbox up to `queue-empty`, then
/// reads and acks live copies until every send is answered (`done`).
async fn replace_connection(
    addr: std::net::SocketAddr,
    b: &Device,
    t1: Instant,
    mut done: watch::Receiver<bool>,
) -> anyhow::Result<Replaced> {
    let mut ws = client::connect(addr, b, None).await?;
    let upgraded = t1.elapsed();
    let before = drain_until_queue_empty(&mut ws, client::IO_TIMEOUT, None).await?;
    let queue_empty = t1.elapsed();
    let mut after = Vec::new();
    while !*done.borrow() {
        tokio::select! {
            changed = done.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(text))) => {
                    let frame = ServerFrame::parse(&text)?;
                    if let Some(env) = frame.envelope.filter(|_| frame.op == "message") {
                        ws.send(Message::Text(ack_frame(&env.guid))).await?;
                        after.push(env.guid.into_owned());
                    }
                }
                Some(Ok(Message::Close(c))) => bail!("closed after queue-empty: {c:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("read after queue-empty: {e}"),
                None => bail!("closed after queue-empty"),
            },
        }
    }
    Ok(Replaced {
        ws,
        upgraded,
        queue_empty,
        before,
        after,
    })
}

/// Waits until `needle` is among the first bytes waiting in `stream`'s
/// receive buffer, without consuming them.
async fn peek_for(stream: &TcpStream, needle: &[u8], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if buf[..n].windows(needle.len()).any(|w| w == needle) => return true,
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    false
}

enum End {
    /// A close frame with this code.
    Closed(u16),
    /// The connection ended without a close frame (reset, or EOF).
    Broken(String),
    StillOpen,
}

/// What the stalled connection held, and how it ended.
struct Aftermath {
    envelopes: u64,
    end: End,
    /// Since the replacing connection started.
    at: Duration,
}

impl std::fmt::Display for Aftermath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let after = format!(
            "{} envelopes read from it, {:.3} s after the new connection started",
            self.envelopes,
            self.at.as_secs_f64()
        );
        match &self.end {
            End::Closed(code) => write!(f, "closed with {code}; {after}"),
            End::Broken(why) => write!(f, "ended without a close frame ({why}); {after}"),
            End::StillOpen => write!(f, "still open; {after}"),
        }
    }
}

impl Aftermath {
    fn json(&self) -> serde_json::Value {
        let (end, code) = match &self.end {
            End::Closed(c) => ("closed".to_owned(), Some(*c)),
            End::Broken(why) => (format!("broken: {why}"), None),
            End::StillOpen => ("open".to_owned(), None),
        };
        json!({"end": end, "close_code": code, "envelopes": self.envelopes,
               "at_s": round3(self.at.as_secs_f64())})
    }
}

/// Reads the stalled connection at last: the envelopes it was pushed, then
/// its close frame or its reset.
async fn aftermath(stream: TcpStream, since: Instant) -> Aftermath {
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    let mut envelopes = 0u64;
    let read = async {
        loop {
            match ws.next().await {
                None => return End::Broken("EOF".into()),
                Some(Err(e)) => return End::Broken(e.to_string()),
                Some(Ok(Message::Close(c))) => {
                    return match c {
                        Some(c) => End::Closed(u16::from(c.code)),
                        None => End::Closed(1005),
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if t.contains(r#""op":"message""#) {
                        envelopes += 1;
                    }
                }
                Some(Ok(_)) => {}
            }
        }
    };
    let end = tokio::time::timeout(AFTERMATH_WAIT, read)
        .await
        .unwrap_or(End::StillOpen);
    Aftermath {
        envelopes,
        end,
        at: since.elapsed(),
    }
}
