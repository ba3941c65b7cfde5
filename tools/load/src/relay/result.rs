//! What one fixed-rate run measured, the checks it implies, and how it is
//! shown (table rows and JSON).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::peer::{ReceiverOut, SenderOut};
use crate::client::Answer;
use crate::cpu::CpuUse;
use crate::stats::{per_sec, round1, round3, Latency, Report};

/// Everything one fixed-rate run measured.
#[derive(Default)]
pub struct StepResult {
    pub target: String,
    pub pairs: usize,
    pub rate: f64,
    pub duration: Duration,
    /// The first part of `duration` left out of the latency figures.
    pub warmup: Duration,
    pub planned: u64,
    pub sent: u64,
    pub delivered_answers: u64,
    pub queued_answers: u64,
    pub other_ok_answers: u64,
    pub error_answers: BTreeMap<u16, u64>,
    pub unanswered: u64,
    pub connect_errors: u64,
    pub transport_errors: u64,
    pub first_errors: Vec<String>,
    pub unexpected_frames: u64,
    pub received_live: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub out_of_order: u64,
    pub pairs_out_of_order: u64,
    pub max_out_of_order_in_pair: u64,
    pub recovered_from_mailbox: u64,
    pub lost: u64,
    pub answer_latency: Latency,
    pub delivery_latency: Latency,
    pub lag: Latency,
    pub last_send: Duration,
    pub last_delivery: Duration,
    /// The server process's CPU from the start of sending until every
    /// sender had its answers, over the sends answered 200 (`None`: its
    /// pid is not known, e.g. `--server` without `--server-pid`).
    pub server_cpu: Option<CpuUse>,
    /// Closed loop: unanswered sends each sender kept at most.
    pub window: Option<u64>,
}

impl StepResult {
    pub fn errors(&self) -> u64 {
        self.error_answers.values().sum::<u64>() + self.connect_errors + self.transport_errors
    }

    /// Unique live deliveries per second, over the time from the start to
    /// the last delivery (at least the send window).
    pub fn delivered_rate(&self) -> f64 {
        per_sec(self.received_live, self.last_delivery.max(self.duration))
    }

    /// Actual send rate over the sending window.
    pub fn sent_rate(&self) -> f64 {
        per_sec(self.sent, self.last_send.max(self.duration))
    }

    /// Sends answered 200 (`delivered`, `queued` or another success).
    pub fn answered_ok(&self) -> u64 {
        self.delivered_answers + self.queued_answers + self.other_ok_answers
    }

    /// Share of the sends written that were answered `delivered` (0–1; 0
    /// when none was written).
    pub fn delivered_share(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.delivered_answers as f64 / self.sent as f64
        }
    }

    /// Violations of the SPEC's delivery guarantee (always fatal).
    pub fn correctness_failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.lost > 0 {
            f.push(format!(
                "{}: {} messages answered 200 but never delivered (rate {})",
                self.target, self.lost, self.rate
            ));
        }
        if self.out_of_order > 0 {
            f.push(format!(
                "{}: {} out-of-order deliveries on {} pairs (rate {})",
                self.target, self.out_of_order, self.pairs_out_of_order, self.rate
            ));
        }
        f
    }

    /// Why this run does not count as sustaining its rate (`None`: it does).
    /// `min_delivered`: the share of sends that must be answered
    /// `delivered` (0: not checked).
    pub fn shortfall(&self, p99_ms: f64, min_delivered: f64) -> Option<String> {
        if !self.correctness_failures().is_empty() {
            return Some("correctness failure".into());
        }
        if self.errors() > 0 {
            return Some(format!("{} errors", self.errors()));
        }
        if self.unanswered > 0 {
            return Some(format!("{} unanswered", self.unanswered));
        }
        if self.sent < self.planned {
            return Some(format!(
                "only {} of {} sent in time",
                self.sent, self.planned
            ));
        }
        if self.received_live < self.sent {
            return Some(format!(
                "{} of {} delivered live",
                self.received_live, self.sent
            ));
        }
        if self.delivered_share() < min_delivered {
            return Some(format!(
                "{:.2} % answered delivered (queued {})",
                self.delivered_share() * 100.0,
                self.queued_answers
            ));
        }
        let p99 = self.delivery_latency.ms(0.99);
        if p99 >= p99_ms {
            return Some(format!("delivery p99 {p99:.2} ms"));
        }
        let lag = self.lag.ms(0.99);
        if lag >= p99_ms {
            return Some(format!("senders behind schedule (lag p99 {lag:.2} ms)"));
        }
        None
    }

    pub fn json(&self) -> Value {
        json!({
            "target": self.target,
            "pairs": self.pairs,
            "offered_rate": self.rate,
            "in_flight_per_sender": self.window,
            "answered_ok_rate": round1(per_sec(self.answered_ok(), self.duration)),
            "duration_s": self.duration.as_secs_f64(),
            "warmup_s": self.warmup.as_secs_f64(),
            "planned": self.planned,
            "sent": self.sent,
            "sent_rate": round1(self.sent_rate()),
            "delivered_rate": round1(self.delivered_rate()),
            "delivered_share": round3(self.delivered_share()),
            "answers": {
                "delivered": self.delivered_answers,
                "queued": self.queued_answers,
                "other_ok": self.other_ok_answers,
                "errors": self.error_answers.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "unanswered": self.unanswered,
            },
            "connect_errors": self.connect_errors,
            "transport_errors": self.transport_errors,
            "unexpected_frames": self.unexpected_frames,
            "received_live": self.received_live,
            "duplicates": self.duplicates,
            "stale": self.stale,
            "out_of_order": self.out_of_order,
            "pairs_out_of_order": self.pairs_out_of_order,
            "max_out_of_order_in_pair": self.max_out_of_order_in_pair,
            "recovered_from_mailbox": self.recovered_from_mailbox,
            "lost": self.lost,
            "answer_latency": self.answer_latency.json(),
            "delivery_latency": self.delivery_latency.json(),
            "send_lag": self.lag.json(),
            "server_cpu": self.server_cpu.map(|c| c.json()),
        })
    }

    /// Table rows for a fixed-rate run.
    pub fn rows(&self, report: &mut Report) {
        report.row("target", self.target.clone());
        report.row(
            "pairs / size",
            format!("{} pairs, {} s", self.pairs, self.duration.as_secs_f64()),
        );
        match self.window {
            Some(w) => report.row(
                "closed loop",
                format!(
                    "{w} unanswered sends per sender at most; {:.0} answered 200 per second",
                    per_sec(self.answered_ok(), self.duration)
                ),
            ),
            None => report.row("offered rate", format!("{:.0} msg/s", self.rate)),
        }
        report.row(
            "sent",
            match self.window {
                // Closed loop, the plan is only a cap.
                Some(_) => format!("{} ({:.0} msg/s)", self.sent, self.sent_rate()),
                None => format!(
                    "{} of {} ({:.0} msg/s)",
                    self.sent,
                    self.planned,
                    self.sent_rate()
                ),
            },
        );
        report.row(
            "delivered",
            format!(
                "{} live ({:.0} msg/s)",
                self.received_live,
                self.delivered_rate()
            ),
        );
        let errors: Vec<String> = self
            .error_answers
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect();
        report.row(
            "answers",
            format!(
                "delivered {}, queued {}, other {}, errors [{}], unanswered {}",
                self.delivered_answers,
                self.queued_answers,
                self.other_ok_answers,
                errors.join(" "),
                self.unanswered
            ),
        );
        if !self.warmup.is_zero() {
            report.row(
                "latency measured over",
                format!(
                    "messages sent after the first {} s (warm-up: fresh devices and connections)",
                    self.warmup.as_secs_f64()
                ),
            );
        }
        report.row("answer latency", self.answer_latency.summary());
        report.row("delivery latency", self.delivery_latency.summary());
        // Closed loop, a send waits for room in the window, not a schedule.
        if self.window.is_none() {
            report.row("send lag", self.lag.summary());
        }
        report.row(
            "server CPU",
            self.server_cpu
                .map_or("n/a (server pid unknown)".into(), |c| c.summary()),
        );
        report.row(
            "lost",
            format!(
                "{} (recovered from mailbox on reconnect: {})",
                self.lost, self.recovered_from_mailbox
            ),
        );
        report.row(
            "out of order",
            format!(
                "{} on {} pairs (max {} in one pair)",
                self.out_of_order, self.pairs_out_of_order, self.max_out_of_order_in_pair
            ),
        );
        report.row(
            "duplicates / stale",
            format!("{} / {}", self.duplicates, self.stale),
        );
        report.row(
            "connection errors",
            format!(
                "connect {}, transport {}, unexpected frames {}",
                self.connect_errors, self.transport_errors, self.unexpected_frames
            ),
        );
        for e in &self.first_errors {
            report.row("  first errors", e.clone());
        }
    }

    /// Keeps the first few error messages of a run for the report.
    pub(super) fn note(&mut self, e: String) {
        if self.first_errors.len() < 5 {
            self.first_errors.push(e);
        }
    }

    /// Adds what sender `i` saw.
    pub(super) fn add_sender(&mut self, i: usize, s: &SenderOut) {
        self.sent += s.sent;
        self.unexpected_frames += s.unexpected_frames;
        self.answer_latency.merge(&s.answer_latency);
        self.lag.merge(&s.lag);
        self.last_send = self.last_send.max(s.last_send);
        if let Some(e) = &s.error {
            self.transport_errors += 1;
            self.note(format!("sender {i}: {e}"));
        }
        for a in s.answers.iter().take(s.sent as usize) {
            match a {
                Some(Answer::Delivered) => self.delivered_answers += 1,
                Some(Answer::Queued) => self.queued_answers += 1,
                Some(Answer::OtherOk) => self.other_ok_answers += 1,
                Some(Answer::Error(code)) => *self.error_answers.entry(*code).or_default() += 1,
                None => self.unanswered += 1,
            }
        }
    }

    /// Adds what receiver `i` saw.
    pub(super) fn add_receiver(&mut self, i: usize, r: &ReceiverOut) {
        self.received_live += r.unique;
        self.duplicates += r.duplicates;
        self.stale += r.stale;
        self.out_of_order += r.out_of_order;
        if r.out_of_order > 0 {
            self.pairs_out_of_order += 1;
        }
        self.max_out_of_order_in_pair = self.max_out_of_order_in_pair.max(r.out_of_order);
        self.delivery_latency.merge(&r.delivery);
        self.last_delivery = self.last_delivery.max(r.last_delivery);
        if let Some(e) = &r.error {
            self.transport_errors += 1;
            self.note(format!("receiver {i}: {e}"));
        }
    }
}
