//! A connection's sends: prepared and routed in frame order, bounded by
//! the in-flight gate, and answered once every copy's outcome is known.
//! Shared by a device's session and an unidentified one.
//!
//! The waits for the outcomes are driven by one task per connection
//! ([`Waits`]), not a task per send. A tokio task is a cache-line aligned
//! allocation, which glibc serves through `posix_memalign` by splitting a
//! larger block and freeing the rest: with its harness and join-handle
//! bookkeeping that was about 6 % of the server's CPU at 90,000 msg/s. A
//! wait here is one ordinary allocation in a `FuturesUnordered`, polled
//! only when its own outcome wakes it.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot::{self, error::TryRecvError};

use super::gate::{InflightGate, RATE_LIMITED_PAUSE};
use crate::error::ApiError;
use crate::service::messaging::{self, SendAs};
use crate::service::state::State;
use crate::wire;

/// What a connection keeps of its sends.
pub(super) struct Sends {
    gate: Rc<InflightGate>,
    /// Completes when the previous send has been routed, so copies are
    /// routed in the order the frames arrived.
    last_routed: Option<oneshot::Receiver<()>>,
    waits: Waits,
}

impl Sends {
    pub(super) fn new(gate: Rc<InflightGate>) -> Self {
        Sends {
            gate,
            last_routed: None,
            waits: Waits::default(),
        }
    }

    /// Prepares and routes one `send` frame. Copies are routed in frame
    /// order: after the previous send of the connection was routed.
    ///
    /// When the previous send is routed and every check of this one can
    /// be made in memory (the usual case on a node alone: rate limit,
    /// cached device sets, known mailbox counts), the send is prepared and
    /// its copies handed on right here, in the frame's handler, and only
    /// the wait for their outcomes is left to [`Waits`]. Otherwise the
    /// whole send goes on there. The gate slot is held meanwhile and given
    /// back even if the session has gone; `answer` gets the result.
    pub(super) fn start(
        &mut self,
        state: State,
        from: SendAs,
        destination: String,
        body: wire::SendRequest,
        answer: impl FnOnce(Result<wire::SendResponse, ApiError>) + 'static,
    ) {
        let gate = self.gate.clone();
        gate.acquire();
        // Boxed, and owning what it uses, so that it can go on later if it
        // cannot finish now.
        let prepare_state = state.clone();
        let mut prepare =
            Box::pin(
                async move { messaging::prepare(&prepare_state, from, &destination, body).await },
            );
        if let Some(mut previous) = self.last_routed.take() {
            // Not routed yet (anything else: routed, or its wait is gone).
            if let Err(TryRecvError::Empty) = previous.try_recv() {
                return self.later(state, prepare, Some(previous), gate, answer);
            }
        }
        // Nothing waits on this poll: a future that is not ready is polled
        // again, with the driver's waker, by `later`.
        let mut now = std::task::Context::from_waker(Waker::noop());
        let prepared = match prepare.as_mut().poll(&mut now) {
            Poll::Ready(prepared) => prepared,
            Poll::Pending => return self.later(state, prepare, None, gate, answer),
        };
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return finish(&gate, answer, Err(e)),
        };
        let routed = messaging::route(&state, prepared);
        if routed.is_taken() {
            // Every copy is handed on; the next send may be routed at once.
            let outcome = routed.outcome;
            return self.waits.push(async move {
                let result = outcome.await;
                finish(&gate, answer, result);
            });
        }
        // In a cluster the router must take a copy first.
        let (routed_tx, routed_rx) = oneshot::channel();
        self.last_routed = Some(routed_rx);
        self.waits.push(async move {
            let result = taken_then_outcome(routed, routed_tx).await;
            finish(&gate, answer, result);
        });
    }

    /// The rest of [`Sends::start`], driven by [`Waits`]: prepared
    /// (`prepare`), routed after `previous`, answered.
    fn later(
        &mut self,
        state: State,
        prepare: Pin<Box<impl Future<Output = Result<messaging::Prepared, ApiError>> + 'static>>,
        previous: Option<oneshot::Receiver<()>>,
        gate: Rc<InflightGate>,
        answer: impl FnOnce(Result<wire::SendResponse, ApiError>) + 'static,
    ) {
        let (routed_tx, routed_rx) = oneshot::channel();
        self.last_routed = Some(routed_rx);
        self.waits.push(async move {
            let prepared = prepare.await;
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let result = match prepared {
                Ok(prepared) => {
                    taken_then_outcome(messaging::route(&state, prepared), routed_tx).await
                }
                Err(e) => {
                    let _ = routed_tx.send(());
                    Err(e)
                }
            };
            finish(&gate, answer, result);
        });
    }
}

/// How long a connection told to close at the drain waits for its sends in
/// flight to be answered before it writes its close frame anyway. Their
/// copies are being spilled, and answered `queued`, as it waits; this bounds
/// a send whose copy waits on another node's device. Well within the two
/// seconds the drain gives connections to finish.
const DRAIN_ANSWER_GRACE: Duration = Duration::from_secs(1);

/// At the drain: runs `close` on the session once the sends `sends` finds
/// have all been answered, or after [`DRAIN_ANSWER_GRACE`]. A send still in
/// flight when its socket closed went unanswered, though its copies were
/// delivered or stored, and a client would send it again.
pub(super) fn close_once_answered<A>(
    ctx: &mut Context<A>,
    sends: fn(&A) -> &Sends,
    close: fn(&mut A, &mut Context<A>),
) where
    A: Actor<Context = Context<A>>,
{
    let until = Instant::now() + DRAIN_ANSWER_GRACE;
    let check = move |act: &mut A, ctx: &mut Context<A>| {
        if sends(act).gate.in_flight() == 0 || Instant::now() >= until {
            close(act, ctx);
        }
    };
    ctx.run_interval(ANSWER_POLL, check);
    ctx.run_later(Duration::ZERO, check);
}

/// How often [`close_once_answered`] looks (a drain is rare and short).
const ANSWER_POLL: Duration = Duration::from_millis(5);

/// A routed send whose copies the router has yet to take (in a cluster):
/// once it has, `routed_signal` lets the connection's next send be routed,
/// then the answer waits for the copies' outcomes.
async fn taken_then_outcome<O: Future>(
    routed: messaging::Routed<O>,
    routed_signal: oneshot::Sender<()>,
) -> O::Output {
    let outcome = routed.taken().await;
    let _ = routed_signal.send(());
    outcome.await
}

/// A send's end: its gate slot back (after a pause if it was rate-limited),
/// then its answer.
fn finish(
    gate: &InflightGate,
    answer: impl FnOnce(Result<wire::SendResponse, ApiError>),
    result: Result<wire::SendResponse, ApiError>,
) {
    if let Err(ApiError::RateLimited { .. }) = result {
        gate.pause(RATE_LIMITED_PAUSE);
    }
    gate.release();
    answer(result);
}

type Wait = Pin<Box<dyn Future<Output = ()>>>;

/// The connection's unfinished sends, driven by one task on the session's
/// thread, started with the first send (an idle connection has none).
///
/// Not `ctx.spawn`: actix polls every future spawned on a context each
/// time the actor wakes, so with hundreds of sends in flight every frame
/// would cost hundreds of polls. The task outlives the session: it ends
/// once the session has dropped its `Waits` and every send has finished,
/// so copies routed before the connection ended are still accounted for.
#[derive(Default)]
struct Waits {
    queue: Option<Rc<RefCell<Queue>>>,
}

/// Sends handed over since the driver last ran.
struct Queue {
    new: Vec<Wait>,
    /// The driver's, while it waits.
    waker: Option<Waker>,
    /// The session still holds its end.
    open: bool,
}

impl Waits {
    fn push(&mut self, wait: impl Future<Output = ()> + 'static) {
        let queue = self.queue.get_or_insert_with(drive);
        let mut queue = queue.borrow_mut();
        queue.new.push(Box::pin(wait));
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    }
}

impl Drop for Waits {
    fn drop(&mut self) {
        if let Some(queue) = &self.queue {
            let mut queue = queue.borrow_mut();
            queue.open = false;
            if let Some(waker) = queue.waker.take() {
                waker.wake();
            }
        }
    }
}

/// Starts the driver on this thread and gives back its queue.
fn drive() -> Rc<RefCell<Queue>> {
    let queue = Rc::new(RefCell::new(Queue {
        new: Vec::new(),
        waker: None,
        open: true,
    }));
    let shared = queue.clone();
    actix::spawn(async move {
        let mut running = FuturesUnordered::<Wait>::new();
        futures_util::future::poll_fn(|cx| loop {
            {
                let mut queue = shared.borrow_mut();
                running.extend(queue.new.drain(..));
                if running.is_empty() && !queue.open {
                    return Poll::Ready(());
                }
                if !queue
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    queue.waker = Some(cx.waker().clone());
                }
                if running.is_empty() {
                    return Poll::Pending;
                }
            }
            // The queue is not borrowed while the sends run: one that
            // finishes writes its answer, which may wake the session.
            if running.poll_next_unpin(cx).is_pending() {
                return Poll::Pending;
            }
        })
        .await
    });
    queue
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Lets the driver run until it has nothing more to do.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[actix::test]
    async fn waits_finish_after_the_session_has_gone() {
        let done = Rc::new(Cell::new(0));
        let mut waits = Waits::default();
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel::<()>();
            outcomes.push(tx);
            let done = done.clone();
            waits.push(async move {
                let _ = rx.await;
                done.set(done.get() + 1);
            });
        }
        let queue = Rc::downgrade(waits.queue.as_ref().expect("started by the first push"));
        settle().await;
        assert_eq!(done.get(), 0, "no outcome yet");

        // The session ends with its sends unanswered: they still finish.
        drop(waits);
        settle().await;
        assert!(queue.upgrade().is_some(), "the driver runs on");
        for tx in outcomes {
            tx.send(()).unwrap();
            settle().await;
        }
        assert_eq!(done.get(), 3);
        assert!(
            queue.upgrade().is_none(),
            "the driver ended with its last wait"
        );
    }

    #[actix::test]
    async fn an_idle_driver_takes_new_waits_and_ends_with_its_session() {
        let done = Rc::new(Cell::new(0));
        let mut waits = Waits::default();
        assert!(
            waits.queue.is_none(),
            "nothing started before the first send"
        );
        for round in 1..=2 {
            let d = done.clone();
            waits.push(async move { d.set(d.get() + 1) });
            settle().await;
            assert_eq!(done.get(), round, "a wait pushed to an idle driver runs");
        }
        let queue = Rc::downgrade(waits.queue.as_ref().unwrap());
        settle().await;
        assert!(
            queue.upgrade().is_some(),
            "idle, but its session may send again"
        );
        drop(waits);
        settle().await;
        assert!(queue.upgrade().is_none(), "ended with its session");
    }
}
