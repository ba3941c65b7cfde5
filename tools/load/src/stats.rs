//! Measuring and reporting: latency histograms (HdrHistogram, microsecond
//! resolution), the once-a-second progress line on stderr, and the
//! [`Report`] every scenario returns — printed as a table for people and as
//! part of the final `RESULT {json}` line for machines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// A latency distribution in microseconds, 1 µs .. 1 h, 3 significant digits.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency(
            Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds are valid"),
        )
    }

    pub fn record(&mut self, d: Duration) {
        self.record_us(d.as_micros().min(u64::MAX as u128) as u64);
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile (0..=1) in milliseconds; 0 when empty.
    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.max() as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        self.0.mean() / 1000.0
    }

    /// `{count, p50_ms, p99_ms, p999_ms, max_ms, mean_ms}`.
    pub fn json(&self) -> Value {
        json!({
            "count": self.count(),
            "p50_ms": round3(self.ms(0.50)),
            "p99_ms": round3(self.ms(0.99)),
            "p999_ms": round3(self.ms(0.999)),
            "max_ms": round3(self.max_ms()),
            "mean_ms": round3(self.mean_ms()),
        })
    }

    /// `p50 0.412 / p99 1.203 / p99.9 3.100 / max 4.000 ms (n=…)`.
    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "no samples".into();
        }
        format!(
            "p50 {:.3} / p99 {:.3} / p99.9 {:.3} / max {:.3} ms (n={})",
            self.ms(0.50),
            self.ms(0.99),
            self.ms(0.999),
            self.max_ms(),
            self.count()
        )
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `count / elapsed`, 0 for an empty interval.
pub fn per_sec(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        0.0
    } else {
        count as f64 / s
    }
}

/// Named counters that the scenario's tasks bump and a reporter prints once
/// a second: `[   3s] relay: sent 3000  answered 2999  delivered 2999  (1000/s)`.
pub struct Progress {
    label: String,
    names: &'static [&'static str],
    counters: Vec<AtomicU64>,
    /// Which counter the rate is computed from.
    rate_of: usize,
}

impl Progress {
    pub fn new(
        label: impl Into<String>,
        names: &'static [&'static str],
        rate_of: usize,
    ) -> Arc<Progress> {
        Arc::new(Progress {
            label: label.into(),
            names,
            counters: names.iter().map(|_| AtomicU64::new(0)).collect(),
            rate_of: rate_of.min(names.len().saturating_sub(1)),
        })
    }

    pub fn add(&self, index: usize, n: u64) {
        if let Some(c) = self.counters.get(index) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, index: usize) -> u64 {
        self.counters
            .get(index)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn counter(&self, index: usize) -> &AtomicU64 {
        &self.counters[index]
    }

    /// Prints a line per second to stderr until the returned guard is
    /// dropped. `quiet` prints nothing.
    pub fn report_every_second(self: &Arc<Self>, quiet: bool) -> ProgressGuard {
        if quiet {
            return ProgressGuard(None);
        }
        let me = self.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut last = me.get(me.rate_of);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = me.get(me.rate_of);
                let fields: Vec<String> = me
                    .names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("{n} {}", me.get(i)))
                    .collect();
                eprintln!(
                    "[{:>5.1}s] {}: {}  ({}/s)",
                    start.elapsed().as_secs_f64(),
                    me.label,
                    fields.join("  "),
                    now.saturating_sub(last)
                );
                last = now;
            }
        });
        ProgressGuard(Some(task))
    }
}

/// Stops the progress line when dropped.
pub struct ProgressGuard(Option<tokio::task::JoinHandle<()>>);

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// What a scenario found: rows for the human table, figures for the JSON
/// line, and the correctness checks that failed (any → exit 1).
#[derive(Default)]
pub struct Report {
    pub scenario: String,
    pub rows: Vec<(String, String)>,
    pub figures: Map<String, Value>,
    pub failures: Vec<String>,
    pub warnings: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_owned(),
            ..Report::default()
        }
    }

    /// A table row only.
    pub fn row(&mut self, name: &str, value: impl Into<String>) {
        self.rows.push((name.to_owned(), value.into()));
    }

    /// A JSON figure only.
    pub fn fig(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.to_owned(), value.into());
    }

    /// A failed correctness check.
    pub fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }

    pub fn warn(&mut self, what: impl Into<String>) {
        self.warnings.push(what.into());
    }

    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn json(&self) -> Value {
        let mut m = self.figures.clone();
        m.insert("scenario".into(), json!(self.scenario));
        m.insert("ok".into(), json!(self.ok()));
        m.insert("failures".into(), json!(self.failures));
        m.insert("warnings".into(), json!(self.warnings));
        Value::Object(m)
    }

    /// The human table.
    pub fn print_table(&self) {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        println!("== {} ==", self.scenario);
        for (k, v) in &self.rows {
            println!("  {k:<width$}  {v}");
        }
        for w in &self.warnings {
            println!("  WARNING: {w}");
        }
        for f in &self.failures {
            println!("  FAILED: {f}");
        }
        println!(
            "  result{}  {}",
            " ".repeat(width.saturating_sub(6)),
            if self.ok() { "ok" } else { "FAILED" }
        );
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_in_ms() {
        let mut l = Latency::new();
        for us in 1..=1000 {
            l.record_us(us);
        }
        assert!((l.ms(0.5) - 0.5).abs() < 0.01);
        assert!((l.max_ms() - 1.0).abs() < 0.01);
        let mut m = Latency::new();
        m.merge(&l);
        assert_eq!(m.count(), 1000);
    }

    #[test]
    fn report_json_has_verdict() {
        let mut r = Report::new("x");
        r.fig("n", 3);
        assert_eq!(r.json()["ok"], true);
        r.fail("lost 1");
        assert_eq!(r.json()["ok"], false);
        assert_eq!(r.json()["n"], 3);
    }
}
