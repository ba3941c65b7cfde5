//! `InflightGate`: backpressure on a connection's sends (SPEC: at most
//! `COURIER_MAX_INFLIGHT_SENDS` unanswered; past that the server stops
//! reading the connection's frames until answers go out), and a short pause
//! after a rate-limited send. [`GatedStream`] wraps the connection's frames
//! and yields nothing while the gate is shut.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::Stream;

use super::transport::Inbox;

/// How long a connection's frames go unread after one of its sends was
/// refused by the rate limit. Without it a client that ignores `429` keeps
/// the server answering refusals as fast as it can write them, and everyone
/// else pays in latency (see BENCHMARKS.md, `courier-load flood`). Short
/// enough that a well-behaved client's acks still arrive long before its
/// copies' ack timeout.
pub const RATE_LIMITED_PAUSE: Duration = Duration::from_millis(100);

/// Counts a connection's unanswered sends. Shared by the session and the
/// tasks that answer its sends (all on the session's thread).
pub struct InflightGate {
    count: Cell<usize>,
    max: usize,
    waker: RefCell<Option<Waker>>,
    paused_until: Cell<Option<Instant>>,
}

impl InflightGate {
    pub fn new(max: usize) -> Rc<Self> {
        Rc::new(InflightGate {
            count: Cell::new(0),
            max,
            waker: RefCell::new(None),
            paused_until: Cell::new(None),
        })
    }

    /// Stops reading frames for `d` from now (or longer, if already paused).
    pub fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        if self.paused_until.get().is_none_or(|t| t < until) {
            self.paused_until.set(Some(until));
        }
    }

    /// Sends taken and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.count.get()
    }

    pub fn acquire(&self) {
        self.count.set(self.count.get() + 1);
    }

    pub fn release(&self) {
        self.count.set(self.count.get().saturating_sub(1));
        if self.count.get() < self.max {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

/// The connection's frames, read only while the gate is open.
pub struct GatedStream {
    inner: Inbox,
    gate: Rc<InflightGate>,
    /// The timer of a pause (see [`InflightGate::pause`]).
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl GatedStream {
    pub fn new(inner: Inbox, gate: Rc<InflightGate>) -> Self {
        GatedStream {
            inner,
            gate,
            sleep: None,
        }
    }
}

impl Stream for GatedStream {
    type Item = <Inbox as Stream>::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(until) = self.gate.paused_until.get() {
            let deadline = tokio::time::Instant::from_std(until);
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            if std::future::Future::poll(sleep.as_mut(), cx).is_pending() {
                self.inner.detach();
                return Poll::Pending;
            }
            self.sleep = None;
            self.gate.paused_until.set(None);
        }
        if self.gate.count.get() >= self.gate.max {
            *self.gate.waker.borrow_mut() = Some(cx.waker().clone());
            // Closed for a while: what the inbox holds must not keep the
            // thread's read storage.
            self.inner.detach();
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
