//! `MailboxWriter`: the one place mailbox writes happen, on a dedicated OS
//! thread so blocking Diesel work never touches the async executors.
//!
//! Writes are queued in order and committed in batches (group commit): the
//! thread takes everything queued, applies it in one transaction, and only
//! then runs each write's completion. So a spill's completion means the copy
//! is on disk — which is what lets a sender be answered `queued` — and a
//! delete queued after an insert of the same guid always finds it.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::domain::address::Address;
use crate::domain::envelope::Envelope;
use crate::metrics::Metrics;
use crate::store::mailbox::{Outcome, Write};
use crate::store::{self, Pool};

/// Writes taken in one transaction at most.
const MAX_BATCH: usize = 2_048;
/// Pause before retrying after the database failed a whole batch.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Called on the writer thread once its write is committed (`Ok(outcome)`)
/// or has failed for good (`Err(())`). Must be quick: a oneshot send.
pub type Completion = Box<dyn FnOnce(Result<Outcome, ()>) + Send>;

enum Op {
    Spill {
        dest: Address,
        envelope: Arc<Envelope>,
        done: Completion,
    },
    Delete {
        dest: Address,
        guid: Uuid,
        done: Completion,
    },
    /// Completes after every write queued before it.
    Barrier(Completion),
}

/// Handle to the writer thread. Cloning is cheap; the thread ends once every
/// handle is dropped and the queue is empty.
#[derive(Clone)]
pub struct MailboxWriter {
    tx: mpsc::Sender<Op>,
}

/// Receiver of one write's outcome.
pub type Done = oneshot::Receiver<Result<Outcome, ()>>;

impl MailboxWriter {
    /// `cap`: copies a device's mailbox may hold; spills beyond it are `Full`.
    pub fn start(
        pool: Pool,
        metrics: Metrics,
        cap: u64,
    ) -> (MailboxWriter, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        let handle = thread::Builder::new()
            .name("mailbox-writer".into())
            .spawn(move || run(pool, metrics, cap, rx))
            .expect("cannot spawn the mailbox writer thread");
        (MailboxWriter { tx }, handle)
    }

    fn push(&self, op: Op) {
        if let Err(mpsc::SendError(op)) = self.tx.send(op) {
            // Only after the thread died: fail the write so nobody waits forever.
            let done = match op {
                Op::Spill { done, .. } | Op::Delete { done, .. } | Op::Barrier(done) => done,
            };
            done(Err(()));
        }
    }

    /// Queues `envelope` for `dest`'s mailbox; `done` runs after the commit.
    pub fn spill_then(&self, dest: Address, envelope: Arc<Envelope>, done: Completion) {
        self.push(Op::Spill {
            dest,
            envelope,
            done,
        });
    }

    /// Queues a spill and returns a receiver for its commit.
    pub fn spill(&self, dest: Address, envelope: Arc<Envelope>) -> Done {
        let (tx, rx) = oneshot::channel();
        self.spill_then(
            dest,
            envelope,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx
    }

    /// Queues the deletion of an acknowledged copy; the receiver says whether
    /// it was there.
    pub fn delete(&self, dest: Address, guid: Uuid) -> Done {
        let (tx, rx) = oneshot::channel();
        self.push(Op::Delete {
            dest,
            guid,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx
    }

    /// Runs `done` once every write queued before this call is committed.
    pub fn barrier_then(&self, done: Completion) {
        self.push(Op::Barrier(done));
    }

    /// Resolves once every write queued before this call is committed.
    pub fn barrier(&self) -> Done {
        let (tx, rx) = oneshot::channel();
        self.push(Op::Barrier(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx
    }
}

fn run(pool: Pool, metrics: Metrics, cap: i64, rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit(&pool, &metrics, cap, &mut batch);
    }
    log::debug!("mailbox writer stopped");
}

/// Commits `batch` as one transaction; if that fails, retries once after a
/// pause, then write by write so one bad write cannot fail its neighbours.
fn commit(pool: &Pool, metrics: &Metrics, cap: i64, batch: &mut Vec<Op>) {
    let started = Instant::now();
    let mut outcome = apply(pool, cap, batch);
    if outcome.is_err() {
        thread::sleep(RETRY_PAUSE);
        outcome = apply(pool, cap, batch);
    }
    match outcome {
        Ok(changed) => {
            log::trace!(
                "mailbox batch of {} committed in {:?}",
                batch.len(),
                started.elapsed()
            );
            finish(metrics, batch.drain(..).zip(changed.into_iter().map(Ok)));
        }
        Err(e) => {
            log::error!(
                "mailbox batch of {} failed ({e}); retrying one by one",
                batch.len()
            );
            for op in batch.drain(..) {
                let result = apply(pool, cap, std::slice::from_ref(&op))
                    .map(|v| v.first().copied().unwrap_or(Outcome::Absent))
                    .map_err(|e| log::error!("mailbox write failed: {e}"));
                finish(metrics, std::iter::once((op, result)));
            }
        }
    }
}

/// Applies every write of `ops` (barriers are no-ops) in one transaction;
/// returns one outcome per op.
fn apply(pool: &Pool, cap: i64, ops: &[Op]) -> Result<Vec<Outcome>, store::StoreError> {
    let writes: Vec<Write<'_>> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Spill { dest, envelope, .. } => Some(Write::Insert {
                dest: *dest,
                envelope,
            }),
            Op::Delete { dest, guid, .. } => Some(Write::Delete {
                dest: *dest,
                guid: *guid,
            }),
            Op::Barrier(_) => None,
        })
        .collect();
    let mut changed = if writes.is_empty() {
        Vec::new()
    } else {
        let mut conn = pool.get()?;
        store::mailbox::apply(&mut conn, &writes, cap)?
    }
    .into_iter();
    Ok(ops
        .iter()
        .map(|op| match op {
            Op::Barrier(_) => Outcome::Absent,
            _ => changed.next().unwrap_or(Outcome::Absent),
        })
        .collect())
}

fn finish(metrics: &Metrics, results: impl Iterator<Item = (Op, Result<Outcome, ()>)>) {
    for (op, result) in results {
        match op {
            Op::Spill { done, .. } => {
                if result == Ok(Outcome::Stored) {
                    metrics.messages_spilled.inc();
                }
                done(result)
            }
            Op::Delete { done, .. } => {
                if result == Ok(Outcome::Deleted) {
                    metrics.messages_acknowledged.inc();
                }
                done(result)
            }
            Op::Barrier(done) => done(result),
        }
    }
}
