//! The two ends of a pair. A sender writes its planned frames on schedule
//! (open loop) while reading the answers; a receiver acks every pushed copy
//! at once and records which of its pair's messages arrived, when, and in
//! what order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, SinkExt, StreamExt};
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::Message;

use super::step::{Plan, StepCtx, ANSWERED, DELIVERED, SENT};
use crate::client::{
    self, close_quietly, read_stamp, send_frame, Answer, Device, ServerFrame, Stamp, Ws,
};
use crate::stats::Latency;

/// What a sender saw.
pub(super) struct SenderOut {
    /// Frames written.
    pub(super) sent: u64,
    /// Per sequence number: how it was answered (`None`: not, or not sent).
    pub(super) answers: Vec<Option<Answer>>,
    pub(super) answer_latency: Latency,
    pub(super) lag: Latency,
    /// When the last frame was written, since the start.
    pub(super) last_send: Duration,
    pub(super) unexpected_frames: u64,
    pub(super) error: Option<String>,
}

impl SenderOut {
    fn ok(a: &Option<Answer>) -> bool {
        matches!(
            a,
            Some(Answer::Delivered | Answer::Queued | Answer::OtherOk)
        )
    }

    /// Sends answered 200.
    pub(super) fn answered_ok(&self) -> u64 {
        self.answers.iter().filter(|a| Self::ok(a)).count() as u64
    }

    /// Sends answered 200 that `r` has not received.
    pub(super) fn missing_at(&self, r: &ReceiverOut) -> u64 {
        self.answers
            .iter()
            .zip(&r.received)
            .filter(|(a, got)| Self::ok(a) && !**got)
            .count() as u64
    }
}

/// What a receiver saw of its pair's stream.
pub(super) struct ReceiverOut {
    /// Per sequence number: whether it arrived.
    pub(super) received: Vec<bool>,
    /// Distinct sequence numbers that arrived live.
    pub(super) unique: u64,
    pub(super) duplicates: u64,
    /// Copies of another run or stream (acked, not counted).
    pub(super) stale: u64,
    /// Arrivals with a lower sequence number than one already arrived.
    pub(super) out_of_order: u64,
    pub(super) delivery: Latency,
    /// When the last new copy arrived, since the start.
    pub(super) last_delivery: Duration,
    pub(super) error: Option<String>,
}

impl ReceiverOut {
    /// Marks `seqs` as received (from the mailbox); how many were new.
    pub(super) fn mark(&mut self, seqs: Vec<u64>) -> u64 {
        let mut new = 0;
        for seq in seqs {
            if let Some(seen) = self.received.get_mut(seq as usize) {
                if !std::mem::replace(seen, true) {
                    new += 1;
                }
            }
        }
        new
    }
}

/// A sender: writes its planned frames on schedule while reading answers.
pub(super) async fn send(
    ws: Ws,
    index: u32,
    receiver: Device,
    plan: Plan,
    ctx: Arc<StepCtx>,
) -> SenderOut {
    let (mut sink, mut stream) = ws.split();
    let count = plan.count;
    // Nanoseconds since start at which message k was written (MAX: not yet).
    let sent_at: Vec<AtomicU64> = (0..count).map(|_| AtomicU64::new(u64::MAX)).collect();
    let sent = AtomicU64::new(0);
    let writer_done = Notify::new();
    // Closed loop: answers so far, and a wakeup for the writer at each.
    let answered_count = AtomicU64::new(0);
    let answer_arrived = Notify::new();

    let writer = async {
        let mut lag = Latency::new();
        let mut k = 0u64;
        let mut error = None;
        let mut last_send = Duration::ZERO;
        'sending: while k < count {
            let due = ctx.start + plan.due(k);
            if due >= ctx.deadline {
                break;
            }
            if let Some(window) = ctx.window {
                if Instant::now() >= ctx.send_until {
                    break;
                }
                if k - answered_count.load(Ordering::Acquire) >= window {
                    let wait = answer_arrived.notified();
                    let _ = tokio::time::timeout_at(ctx.send_until.into(), wait).await;
                    continue;
                }
            }
            let now = Instant::now();
            if due > now {
                tokio::time::sleep_until(due.into()).await;
                continue;
            }
            let now_ns = ctx.now_ns();
            let mut batch = 0u64;
            let room = ctx.window.map_or(u64::MAX, |w| {
                w.saturating_sub(k - answered_count.load(Ordering::Acquire))
            });
            while k < count && ctx.start + plan.due(k) <= now && batch < 256.min(room) {
                let stamp = Stamp {
                    run: ctx.run,
                    stream: index,
                    seq: k,
                    sent_ns: now_ns,
                };
                let content = ctx.payload.content(stamp);
                let frame = send_frame(
                    k,
                    &receiver,
                    ctx.start_epoch_ms + now_ns / 1_000_000,
                    &content,
                );
                sent_at[k as usize].store(now_ns, Ordering::Relaxed);
                if ctx.measured(now_ns) {
                    lag.record(now.saturating_duration_since(ctx.start + plan.due(k)));
                }
                if let Err(e) = sink.feed(Message::Text(frame)).await {
                    error = Some(format!("write: {e}"));
                    break 'sending;
                }
                k += 1;
                batch += 1;
            }
            sent.store(k, Ordering::Release);
            ctx.progress.add(SENT, batch);
            last_send = ctx.start.elapsed();
            if let Err(e) = sink.flush().await {
                error = Some(format!("flush: {e}"));
                break;
            }
        }
        sent.store(k, Ordering::Release);
        writer_done.notify_one();
        (lag, error, last_send)
    };

    let reader = async {
        let mut answers: Vec<Option<Answer>> = vec![None; count as usize];
        let mut answered = 0u64;
        let mut latency = Latency::new();
        let mut unexpected = 0u64;
        let mut error = None;
        let mut done = false;
        loop {
            if done && answered >= sent.load(Ordering::Acquire) {
                break;
            }
            let next = tokio::select! {
                r = tokio::time::timeout_at(ctx.deadline.into(), stream.next()) => r,
                _ = writer_done.notified(), if !done => { done = true; continue; }
            };
            let text = match next {
                Err(_) => break,
                Ok(None) => {
                    error = Some("connection closed".to_owned());
                    break;
                }
                Ok(Some(Err(e))) => {
                    error = Some(format!("read: {e}"));
                    break;
                }
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(c)))) => {
                    error = Some(format!("closed by server: {c:?}"));
                    break;
                }
                Ok(Some(Ok(_))) => continue,
            };
            let now_ns = ctx.now_ns();
            let Ok(frame) = ServerFrame::parse(&text) else {
                unexpected += 1;
                continue;
            };
            if frame.op != "response" {
                unexpected += 1;
                continue;
            }
            match frame.id {
                Some(id) if id < count && answers[id as usize].is_none() => {
                    answers[id as usize] = Some(frame.answer());
                    answered += 1;
                    answered_count.store(answered, Ordering::Release);
                    answer_arrived.notify_one();
                    ctx.progress.add(ANSWERED, 1);
                    let at = sent_at[id as usize].load(Ordering::Relaxed);
                    if ctx.measured(at) {
                        latency.record_us(now_ns.saturating_sub(at) / 1000);
                    }
                }
                _ => unexpected += 1,
            }
        }
        (answers, latency, unexpected, error)
    };

    let ((lag, write_error, last_send), (answers, answer_latency, unexpected_frames, read_error)) =
        tokio::join!(writer, reader);
    if let Ok(ws) = sink.reunite(stream) {
        close_quietly(ws).await;
    }
    SenderOut {
        sent: sent.load(Ordering::Acquire),
        answers,
        answer_latency,
        lag,
        last_send,
        unexpected_frames,
        error: write_error.or(read_error),
    }
}

/// A receiver: acks every pushed copy at once and records which of its
/// pair's messages arrived, when and in what order, until told to stop.
pub(super) async fn receive(
    ws: Ws,
    index: u32,
    planned: u64,
    ctx: Arc<StepCtx>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverOut {
    let (mut sink, mut stream) = ws.split();
    let mut out = ReceiverOut {
        received: vec![false; planned as usize],
        unique: 0,
        duplicates: 0,
        stale: 0,
        out_of_order: 0,
        delivery: Latency::new(),
        last_delivery: Duration::ZERO,
        error: None,
    };
    let mut highest: Option<u64> = None;
    'reading: loop {
        let first = tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = tokio::time::timeout_at(ctx.hard_deadline.into(), stream.next()) => r,
        };
        // Handle this frame and whatever else is already buffered, then
        // flush all their acks in one write.
        let mut item = Some(first);
        while let Some(next) = item.take() {
            let text = match next {
                Err(_) => break 'reading,
                Ok(None) => {
                    out.error = Some("connection closed".into());
                    break 'reading;
                }
                Ok(Some(Err(e))) => {
                    out.error = Some(format!("read: {e}"));
                    break 'reading;
                }
                Ok(Some(Ok(Message::Text(t)))) => Some(t),
                Ok(Some(Ok(Message::Close(c)))) => {
                    out.error = Some(format!("closed by server: {c:?}"));
                    break 'reading;
                }
                Ok(Some(Ok(_))) => None,
            };
            if let Some(text) = text {
                let now_ns = ctx.now_ns();
                if let Ok(ServerFrame {
                    envelope: Some(env),
                    ..
                }) = ServerFrame::parse(&text)
                {
                    match read_stamp(&env.content) {
                        Some(s) if s.run == ctx.run && s.stream == index && s.seq < planned => {
                            let seen = &mut out.received[s.seq as usize];
                            if *seen {
                                out.duplicates += 1;
                            } else {
                                *seen = true;
                                out.unique += 1;
                                ctx.progress.add(DELIVERED, 1);
                                if highest.is_some_and(|h| s.seq < h) {
                                    out.out_of_order += 1;
                                }
                                highest = Some(highest.map_or(s.seq, |h| h.max(s.seq)));
                                if ctx.measured(s.sent_ns) {
                                    out.delivery
                                        .record_us(now_ns.saturating_sub(s.sent_ns) / 1000);
                                }
                                out.last_delivery = Duration::from_nanos(now_ns);
                            }
                        }
                        _ => out.stale += 1,
                    }
                    if let Err(e) = sink.feed(Message::Text(client::ack_frame(&env.guid))).await {
                        out.error = Some(format!("ack: {e}"));
                        break 'reading;
                    }
                }
            }
            item = stream.next().now_or_never().map(Ok);
        }
        if let Err(e) = sink.flush().await {
            out.error = Some(format!("flush acks: {e}"));
            break;
        }
    }
    if let Ok(ws) = sink.reunite(stream) {
        close_quietly(ws).await;
    }
    out
}
