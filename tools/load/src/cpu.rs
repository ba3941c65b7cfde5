//! Server CPU time per relayed message (issue 13: courier's ≤ 3 × the bare
//! relay's).
//!
//! A process's CPU time is `utime + stime` of `/proc/PID/stat` (fields 14
//! and 15, in clock ticks of `getconf CLK_TCK`, 100 on Linux), which sums
//! every thread of the process, including threads that have already exited.
//! The relay steps read it just before the senders start and again once
//! every sender has its answers, and divide the difference by the sends
//! answered 200. Both courier and the bare relay run as their own processes
//! (see [`crate::ceiling`]), so one reading measures both the same way.
//!
//! Resolution is one tick (10 ms) per reading, so a window's figure is good
//! to ±20 ms of CPU: ±0.7 µs per message for a 3 s step at 10,000 msg/s,
//! less at higher rates. Kernel work on loopback is charged to whichever
//! thread runs when it happens (partly the tool's own senders), equally for
//! both servers.

use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::stats::{round1, round3};

/// `utime + stime` from the text of a `/proc/PID/stat` file, in clock ticks.
///
/// Field 2, `(comm)`, is the executable's name and may itself contain
/// spaces and parentheses, so the fields are counted from the LAST `)`:
/// after it come field 3 (state), …, 14 (utime), 15 (stime).
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_ascii_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time process `pid` has used so far, in clock ticks; `None` if it is
/// gone or the file is not readable.
pub fn ticks_of(pid: u32) -> Option<u64> {
    parse_stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; `sysconf` itself would need
/// `unsafe`, which this crate forbids). 100 if `getconf` is unavailable:
/// USER_HZ is 100 on every common Linux architecture.
pub fn ticks_per_sec() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// A reading taken at the start of a window, of one process or several
/// (the nodes of a cluster, whose CPU per message is their sum).
#[derive(Clone, Debug)]
pub struct CpuMark {
    start: Vec<(u32, u64)>,
}

impl CpuMark {
    /// Reads every process of `pids` now (`None` if there is none, or one
    /// cannot be read: a partial sum would understate the cost).
    pub fn now_all(pids: &[u32]) -> Option<CpuMark> {
        let start = pids
            .iter()
            .map(|&pid| Some((pid, ticks_of(pid)?)))
            .collect::<Option<Vec<_>>>()?;
        (!start.is_empty()).then_some(CpuMark { start })
    }

    /// The CPU used since this mark, summed over its processes, for
    /// `messages` relayed messages.
    pub fn since(&self, messages: u64) -> Option<CpuUse> {
        let mut ticks = 0;
        for &(pid, then) in &self.start {
            ticks += ticks_of(pid)?.saturating_sub(then);
        }
        Some(CpuUse {
            ticks,
            ticks_per_sec: ticks_per_sec(),
            messages,
        })
    }
}

/// Server CPU over one measured window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    pub ticks: u64,
    pub ticks_per_sec: u64,
    /// Sends answered 200 in the window.
    pub messages: u64,
}

impl CpuUse {
    pub fn seconds(&self) -> f64 {
        self.ticks as f64 / self.ticks_per_sec.max(1) as f64
    }

    /// Microseconds of server CPU per relayed message (`None`: none relayed).
    pub fn us_per_msg(&self) -> Option<f64> {
        (self.messages > 0).then(|| self.seconds() * 1e6 / self.messages as f64)
    }

    /// `12.3 µs/msg (0.45 s CPU for 36000 messages)`.
    pub fn summary(&self) -> String {
        match self.us_per_msg() {
            Some(us) => format!(
                "{us:.1} µs/msg ({:.2} s CPU for {} messages)",
                self.seconds(),
                self.messages
            ),
            None => format!("{:.2} s CPU, no message relayed", self.seconds()),
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "ticks": self.ticks,
            "ticks_per_s": self.ticks_per_sec,
            "cpu_s": round3(self.seconds()),
            "messages": self.messages,
            "us_per_msg": self.us_per_msg().map(round1),
        })
    }
}

/// `µs/msg` with one decimal, or `n/a`.
pub fn us_or_na(c: Option<&CpuUse>) -> String {
    match c.and_then(CpuUse::us_per_msg) {
        Some(us) => format!("{us:.1} µs/msg"),
        None => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_14_and_15_after_the_last_paren() {
        // A real line of a courier process: utime 1234, stime 567.
        let plain = "4242 (courier) S 1 4242 4242 0 -1 4194304 1200 0 0 0 1234 567 0 0 \
                     20 0 5 0 100 123456789 3000 18446744073709551615";
        assert_eq!(parse_stat_ticks(plain), Some(1234 + 567));
        // comm (≤ 15 bytes) with spaces and parentheses, even a `) S 1`
        // lookalike: counting from the first `)` would read 0 + 0 here.
        let tricky = "77 () S 1 (x)) R 1 77 77 0 -1 0 0 0 0 0 30 12 0 0 20 0";
        assert_eq!(parse_stat_ticks(tricky), Some(42));
        let spaced = "77 (my server) R 1 77 77 0 -1 0 0 0 0 0 7 3 0 0 20 0";
        assert_eq!(parse_stat_ticks(spaced), Some(10));
    }

    #[test]
    fn stat_that_is_cut_short_or_garbled() {
        assert_eq!(parse_stat_ticks(""), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 5"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 u s"), None);
        assert_eq!(parse_stat_ticks("1 x S 1 1 1 0 -1 0 0 0 0 0 1 2"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let t = ticks_of(std::process::id()).expect("/proc/self/stat");
        // Burn a little CPU; the count never goes down.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(ticks_of(std::process::id()).unwrap() >= t);
        assert!(ticks_per_sec() > 0);
    }

    #[test]
    fn per_message() {
        let c = CpuUse {
            ticks: 45,
            ticks_per_sec: 100,
            messages: 30_000,
        };
        assert!((c.us_per_msg().unwrap() - 15.0).abs() < 1e-9);
        assert_eq!(c.json()["us_per_msg"], 15.0);
        let none = CpuUse { messages: 0, ..c };
        assert_eq!(none.us_per_msg(), None);
        assert_eq!(us_or_na(None), "n/a");
    }
}
