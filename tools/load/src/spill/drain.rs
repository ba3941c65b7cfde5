//! The drain half of `spill`: every recipient connects at once, reads its
//! mailbox up to `queue-empty` acking each envelope, and the result is
//! checked against the sends that were answered `queued`. A reconnect
//! afterwards counts copies pushed again although they were acked.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use super::SPILL_RUN;
use crate::client::{self, close_quietly, drain_until_queue_empty, Device};
use crate::stats::{per_sec, round1, Progress, Report};

/// Connects every recipient at once, drains and acks its mailbox, and
/// checks the result against the sends answered `queued`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn drain(
    addr: std::net::SocketAddr,
    recipients: &Arc<Vec<Device>>,
    queued: &[bool],
    n_queued: u64,
    timeout: Duration,
    quiet: bool,
    report: &mut Report,
    figures: &mut serde_json::Value,
) {
    let k = recipients.len();
    let progress = Progress::new("drain", &["envelopes"], 0);
    let line = progress.report_every_second(quiet);
    let start = Instant::now();
    // Each recipient: its envelopes, when its queue-empty arrived, and its
    // closing handshake running in the background (courier takes ~1 s to
    // drop a closed socket, which is no part of draining).
    type Drained = (Vec<client::Pushed>, Instant, tokio::task::JoinHandle<()>);
    let results: Vec<anyhow::Result<Drained>> = futures_util::stream::iter(recipients.iter())
        .map(|d| {
            let progress = progress.clone();
            async move {
                let fut = async {
                    let mut ws = client::connect(addr, d, None).await?;
                    let pushed = drain_until_queue_empty(
                        &mut ws,
                        client::IO_TIMEOUT,
                        Some(progress.counter(0)),
                    )
                    .await?;
                    Ok((pushed, Instant::now(), tokio::spawn(close_quietly(ws))))
                };
                tokio::time::timeout(timeout, fut)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("drain timed out")))
            }
        })
        .buffered(512)
        .collect()
        .await;
    let last_queue_empty = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|(_, at, _)| *at))
        .max()
        .unwrap_or(start);
    let elapsed = last_queue_empty.saturating_duration_since(start);
    drop(line);

    let mut seen = vec![false; queued.len()];
    let mut guids = HashSet::new();
    let (mut envelopes, mut duplicate_guids, mut wrong_recipient, mut foreign) =
        (0u64, 0u64, 0u64, 0u64);
    let mut redelivered_stamps = 0u64;
    let mut errors = Vec::new();
    for (r, res) in results.into_iter().enumerate() {
        let pushed = match res {
            Ok((p, _, closing)) => {
                let _ = closing.await;
                p
            }
            Err(e) => {
                errors.push(format!("recipient {r}: {e:#}"));
                continue;
            }
        };
        for p in pushed {
            envelopes += 1;
            if !guids.insert(p.guid) {
                duplicate_guids += 1;
            }
            match p.stamp {
                Some(s) if s.run == SPILL_RUN && (s.seq as usize) < seen.len() => {
                    if (s.seq % k as u64) as usize != r {
                        wrong_recipient += 1;
                    }
                    if std::mem::replace(&mut seen[s.seq as usize], true) {
                        redelivered_stamps += 1;
                    }
                }
                _ => foreign += 1,
            }
        }
    }
    let missing = queued
        .iter()
        .zip(&seen)
        .filter(|(q, s)| **q && !**s)
        .count() as u64;
    let drain_rate = per_sec(envelopes, elapsed);
    report.row(
        "drain",
        format!(
            "{envelopes} envelopes to {k} recipients in {:.2} s",
            elapsed.as_secs_f64()
        ),
    );
    report.row("drained", format!("{drain_rate:.0} msg/s"));
    report.row(
        "drain check",
        format!(
            "distinct guids {} of {n_queued} queued, missing {missing}, duplicate guids {duplicate_guids}, same message twice {redelivered_stamps}, wrong recipient {wrong_recipient}, foreign {foreign}",
            guids.len()
        ),
    );
    for e in errors.iter().take(3) {
        report.fail(format!("drain: {e}"));
    }
    if guids.len() as u64 != n_queued {
        report.fail(format!(
            "drained {} distinct guids, but {n_queued} sends were answered queued",
            guids.len()
        ));
    }
    if missing > 0 {
        report.fail(format!(
            "{missing} queued messages never came back from the mailbox"
        ));
    }
    if wrong_recipient > 0 {
        report.fail(format!(
            "{wrong_recipient} messages drained by the wrong recipient"
        ));
    }

    // Everything was acked: a fresh connection should find empty mailboxes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again: Vec<usize> = futures_util::stream::iter(recipients.iter())
        .map(|d| async move {
            let fut = async {
                let mut ws = client::connect(addr, d, None).await?;
                let pushed = drain_until_queue_empty(&mut ws, client::IO_TIMEOUT, None).await?;
                close_quietly(ws).await;
                anyhow::Ok(pushed.len())
            };
            tokio::time::timeout(client::IO_TIMEOUT, fut)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0)
        })
        .buffered(256)
        .collect()
        .await;
    let after_ack: usize = again.iter().sum();
    report.row(
        "left after ack",
        format!("{after_ack} envelopes pushed again on reconnect"),
    );
    if after_ack > 0 {
        report.warn(format!(
            "{after_ack} acked messages were pushed again on a later connection"
        ));
    }
    figures["drain"] = json!({
        "envelopes": envelopes,
        "drain_s": elapsed.as_secs_f64(),
        "drain_rate": round1(drain_rate),
        "distinct_guids": guids.len(),
        "missing": missing,
        "duplicate_guids": duplicate_guids,
        "same_message_twice": redelivered_stamps,
        "wrong_recipient": wrong_recipient,
        "foreign": foreign,
        "errors": errors.len(),
        "left_after_ack": after_ack,
    });
}
