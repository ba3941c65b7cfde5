//! One fixed-rate run: connect every pair (receivers first, each past its
//! `queue-empty`), start all senders and receivers on one common clock,
//! collect what each saw, and before calling anything lost, look in the
//! receiver's mailbox for copies answered 200 but not seen live.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::peer::{receive, send};
use super::{Pair, StepResult, Target};
use crate::client::{self, close_quietly, drain_until_queue_empty, Device, PayloadMaker, Ws};
use crate::cpu::CpuMark;
use crate::stats::Progress;

/// Every run (step) gets its own number, stamped into its messages, so
/// copies of an earlier step that a mailbox hands back are told apart.
static NEXT_RUN: AtomicU32 = AtomicU32::new(1);

/// One fixed-rate run.
#[derive(Clone, Debug)]
pub struct StepConfig {
    pub rate: f64,
    pub duration: Duration,
    /// Messages sent before this much of `duration` has passed are left
    /// out of the latency figures (see `RelayArgs::warmup_secs`).
    pub warmup: Duration,
    pub size: usize,
    pub grace: Duration,
    pub quiet: bool,
    /// Closed loop: each sender keeps at most this many sends unanswered
    /// (`rate` then only caps it), and stops sending after `duration`.
    pub window: Option<u64>,
}

/// When each message of one sender is due.
#[derive(Clone, Copy)]
pub(super) struct Plan {
    index: u64,
    senders: u64,
    rate: f64,
    /// How many messages this sender sends.
    pub(super) count: u64,
}

impl Plan {
    /// The `k`-th message of sender `index`: `(index + k·senders) / rate` s.
    pub(super) fn due(&self, k: u64) -> Duration {
        let slot = self.index as f64 + k as f64 * self.senders as f64;
        Duration::from_secs_f64(slot / self.rate)
    }

    /// Sender `index`'s share of `round(rate · duration)` messages.
    pub(super) fn new(index: usize, senders: usize, rate: f64, duration: Duration) -> Plan {
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let (i, n) = (index as u64, senders.max(1) as u64);
        let count = if total > i {
            (total - i).div_ceil(n)
        } else {
            0
        };
        Plan {
            index: i,
            senders: n,
            rate,
            count,
        }
    }
}

/// What every task of one run shares.
pub(super) struct StepCtx {
    /// This run's number (in every stamp).
    pub(super) run: u32,
    /// The common clock: stamps and schedules count from here.
    pub(super) start: Instant,
    /// `start` in milliseconds since the epoch (a send's `timestamp`).
    pub(super) start_epoch_ms: u64,
    /// Senders stop writing, and stop waiting for answers, at this instant.
    pub(super) deadline: Instant,
    /// Receivers give up by themselves at this instant.
    pub(super) hard_deadline: Instant,
    pub(super) payload: PayloadMaker,
    /// Counters `SENT`, `ANSWERED`, `DELIVERED`.
    pub(super) progress: Arc<Progress>,
    /// Closed loop: unanswered sends each sender keeps at most.
    pub(super) window: Option<u64>,
    /// Closed loop: senders write nothing new from this instant.
    pub(super) send_until: Instant,
    /// Messages sent before this many nanoseconds after `start` are not
    /// in the latency figures.
    pub(super) warmup_ns: u64,
}

pub(super) const SENT: usize = 0;
pub(super) const ANSWERED: usize = 1;
pub(super) const DELIVERED: usize = 2;

impl StepCtx {
    pub(super) fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Whether a message sent at `sent_ns` counts in the latency figures.
    pub(super) fn measured(&self, sent_ns: u64) -> bool {
        sent_ns >= self.warmup_ns
    }
}

/// Connects a device and consumes its stored mailbox (acking it) up to
/// `queue-empty`. Returns the socket and the number of stale copies.
async fn connect_ready(addr: SocketAddr, device: &Device) -> anyhow::Result<(Ws, u64)> {
    let mut ws = client::connect(addr, device, None).await?;
    let stale = drain_until_queue_empty(&mut ws, client::IO_TIMEOUT, None).await?;
    Ok((ws, stale.len() as u64))
}

/// One fixed-rate run over `pairs` (fresh connections for every run).
pub async fn run_step(target: &Target, pairs: &[Pair], cfg: &StepConfig) -> StepResult {
    let run = NEXT_RUN.fetch_add(1, Ordering::Relaxed);
    let n = pairs.len();
    let mut result = StepResult {
        target: target.name.to_owned(),
        pairs: n,
        rate: cfg.rate,
        duration: cfg.duration,
        warmup: cfg.warmup.min(cfg.duration),
        ..StepResult::default()
    };

    // Receivers first, each past its queue-empty; then the senders.
    let receivers = futures_util::future::join_all(
        pairs
            .iter()
            .enumerate()
            .map(|(i, p)| connect_ready(target.receiver_addr(i), &p.receiver)),
    )
    .await;
    let senders =
        futures_util::future::join_all(pairs.iter().map(|p| connect_ready(target.addr, &p.sender)))
            .await;
    let mut connected = Vec::new();
    for (i, (r, s)) in receivers.into_iter().zip(senders).enumerate() {
        match (r, s) {
            (Ok((rw, a)), Ok((sw, b))) => {
                result.stale += a + b;
                connected.push((i, rw, sw));
            }
            (r, s) => {
                for e in [r.err(), s.err()].into_iter().flatten() {
                    result.connect_errors += 1;
                    result.note(format!("connect: {e:#}"));
                }
            }
        }
    }

    let progress = Progress::new(
        format!("{}@{:.0}/s", target.name, cfg.rate),
        &["sent", "answered", "delivered"],
        DELIVERED,
    );
    let start = Instant::now() + Duration::from_millis(20);
    let ctx = Arc::new(StepCtx {
        run,
        start,
        start_epoch_ms: client::epoch_ms() + 20,
        deadline: start + cfg.duration + cfg.grace,
        hard_deadline: start + cfg.duration + cfg.grace + Duration::from_secs(5),
        payload: PayloadMaker::new(cfg.size),
        progress: progress.clone(),
        window: cfg.window,
        send_until: start + cfg.duration,
        warmup_ns: cfg.warmup.min(cfg.duration).as_nanos() as u64,
    });
    let _line = progress.report_every_second(cfg.quiet);
    let (stop_tx, stop_rx) = watch::channel(false);
    // The server's CPU over the measured window: from here (connections are
    // up, nothing sent yet) until every sender has its answers.
    let cpu_mark = CpuMark::now_all(&target.pids());
    let mut tasks = Vec::new();
    for (i, rw, sw) in connected {
        let plan = Plan::new(i, n, cfg.rate, cfg.duration);
        result.planned += plan.count;
        result.window = cfg.window;
        let receiver = receive(rw, i as u32, plan.count, ctx.clone(), stop_rx.clone());
        let sender = send(sw, i as u32, pairs[i].receiver.clone(), plan, ctx.clone());
        tasks.push((i, tokio::spawn(sender), tokio::spawn(receiver)));
    }

    // Senders end by themselves (all answered, or the deadline).
    let mut ends = BTreeMap::new();
    let mut receivers = Vec::new();
    for (i, sender, receiver) in tasks {
        match sender.await {
            Ok(out) => {
                ends.insert(i, out);
            }
            Err(e) => {
                result.transport_errors += 1;
                result.note(format!("sender task: {e}"));
            }
        }
        receivers.push((i, receiver));
    }
    // Every copy answered 200 should be at its receiver by now or shortly.
    let answered_ok: u64 = ends.values().map(|s| s.answered_ok()).sum();
    result.server_cpu = cpu_mark.and_then(|m| m.since(answered_ok));
    let settle = Instant::now() + Duration::from_secs(2);
    while progress.get(DELIVERED) < answered_ok && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    for (i, receiver) in receivers {
        let Some(sender) = ends.get(&i) else {
            continue;
        };
        let mut received = match receiver.await {
            Ok(out) => out,
            Err(e) => {
                result.transport_errors += 1;
                result.note(format!("receiver task: {e}"));
                continue;
            }
        };
        // Answered 200 but not seen live: a copy spilled to the mailbox is
        // pushed again on the next connection, so look before calling it lost.
        if target.has_mailbox && sender.missing_at(&received) > 0 {
            match mailbox_stamps(target.receiver_addr(i), &pairs[i].receiver, run, i as u32).await {
                Ok(seqs) => result.recovered_from_mailbox += received.mark(seqs),
                Err(e) => result.note(format!("reconnect receiver {i}: {e:#}")),
            }
        }
        result.lost += sender.missing_at(&received);
        result.add_sender(i, sender);
        result.add_receiver(i, &received);
    }
    result
}

/// Reconnects `device` and returns the sequence numbers of stream `stream`
/// of run `run` that its mailbox pushed (and that were acked on the way).
async fn mailbox_stamps(
    addr: SocketAddr,
    device: &Device,
    run: u32,
    stream: u32,
) -> anyhow::Result<Vec<u64>> {
    let mut ws = client::connect(addr, device, None).await?;
    let pushed = drain_until_queue_empty(&mut ws, client::IO_TIMEOUT, None).await;
    close_quietly(ws).await;
    Ok(pushed?
        .iter()
        .filter_map(|p| p.stamp)
        .filter(|s| s.run == run && s.stream == stream)
        .map(|s| s.seq)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_spread_the_rate_over_senders() {
        let d = Duration::from_secs(2);
        let plans: Vec<Plan> = (0..3).map(|i| Plan::new(i, 3, 1000.0, d)).collect();
        assert_eq!(plans.iter().map(|p| p.count).sum::<u64>(), 2000);
        // Global slots interleave: sender 1's first message is due at 1 ms.
        assert_eq!(plans[1].due(0), Duration::from_millis(1));
        assert_eq!(plans[0].due(1), Duration::from_millis(3));
        let last = plans[2].due(plans[2].count - 1);
        assert!(last < d);
    }
}
