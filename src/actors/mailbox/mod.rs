//! `MailboxWriter`: the one place mailbox writes happen, on a dedicated OS
//! thread so blocking Diesel work never touches the async executors.
//!
//! Writes are queued in order and committed in batches (group commit): the
//! thread takes everything queued, applies it in one transaction, and only
//! then runs each write's completion. So a spill's completion means the copy
//! is on disk — which is what lets a sender be answered `queued` — and a
//! delete queued after an insert of the same guid always finds it.
//!
//! The writer stores every copy it is given: room was reserved before the
//! send was routed ([`quota`]), and it keeps the quota's counts in step with
//! what it commits.

pub mod quota;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::group_commit::GroupCommit;
use super::router::RouteReply;
use uuid::Uuid;

use self::quota::{Change, Quota};
use crate::domain::address::Address;
use crate::domain::at_rest::StorageKeys;
use crate::domain::envelope::Envelope;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::mailbox::{Outcome, Write};
use crate::store::{self, Pool};
use crate::wire::DeliveryStatus;

/// Writes taken in one transaction at most.
const MAX_BATCH: usize = 2_048;
/// Pause before retrying after the database failed a whole batch.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Called on the writer thread once its write is committed (`Ok(outcome)`)
/// or has failed for good (`Err(())`). Must be quick: a oneshot send.
pub type Completion = Box<dyn FnOnce(Result<Outcome, ()>) + Send>;

/// A copy could not be stored: the database failed the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageFailed;

impl From<StorageFailed> for ApiError {
    fn from(_: StorageFailed) -> Self {
        ApiError::Internal
    }
}

/// What a committed (or failed) spill means for its sender.
pub fn spill_status(outcome: Result<Outcome, ()>) -> Result<DeliveryStatus, StorageFailed> {
    match outcome {
        Ok(Outcome::Stored) => Ok(DeliveryStatus::Queued),
        Ok(_) | Err(()) => Err(StorageFailed),
    }
}

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
    /// Reads the stored counts of `dests` into the quota, after the commit
    /// of everything queued before it.
    Load {
        dests: Vec<Address>,
        done: Completion,
    },
}

/// Handle to the writer thread. Cloning is cheap; the thread ends once every
/// handle is dropped and the queue is empty.
#[derive(Clone)]
pub struct MailboxWriter {
    worker: GroupCommit<Op>,
    quota: Arc<Quota>,
}

/// Receiver of one write's outcome.
pub type Done = oneshot::Receiver<Result<Outcome, ()>>;

impl MailboxWriter {
    /// `quota`: the room reserved per device, kept in step with commits.
    /// `keys`: what rows are sealed under (`None`: stored in the clear).
    pub fn start(
        pool: Pool,
        metrics: Metrics,
        quota: Arc<Quota>,
        keys: Option<Arc<StorageKeys>>,
    ) -> (MailboxWriter, thread::JoinHandle<()>) {
        let thread_quota = quota.clone();
        let (worker, handle) =
            GroupCommit::start("mailbox-writer".into(), MAX_BATCH, move |batch| {
                commit(&pool, &metrics, &thread_quota, keys.as_deref(), batch)
            });
        (MailboxWriter { worker, quota }, handle)
    }

    /// The quota this writer keeps counts for.
    pub fn quota(&self) -> &Arc<Quota> {
        &self.quota
    }

    fn push(&self, op: Op) {
        if let Err(op) = self.worker.push(op) {
            // Only after the thread died: fail the write so nobody waits forever.
            let done = match op {
                Op::Spill { done, .. }
                | Op::Delete { done, .. }
                | Op::Barrier(done)
                | Op::Load { done, .. } => done,
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

    /// Queues a spill and answers its sender once it is committed.
    pub fn spill_answering(&self, dest: Address, envelope: Arc<Envelope>, reply: RouteReply) {
        self.spill_then(
            dest,
            envelope,
            Box::new(move |r| {
                let _ = reply.send(spill_status(r));
            }),
        );
    }

    /// As [`Self::spill_answering`], and runs `stored` after the commit if
    /// the copy is new in the mailbox (not if it failed, or was there already).
    pub fn spill_answering_then(
        &self,
        dest: Address,
        envelope: Arc<Envelope>,
        reply: RouteReply,
        stored: impl FnOnce() + Send + 'static,
    ) {
        self.spill_then(
            dest,
            envelope,
            Box::new(move |r| {
                let new = r == Ok(Outcome::Stored);
                let _ = reply.send(spill_status(r));
                if new {
                    stored();
                }
            }),
        );
    }

    /// Reads the stored counts of `dests` into the quota; resolves after.
    pub fn load_counts(&self, dests: Vec<Address>) -> Done {
        let (tx, rx) = oneshot::channel();
        self.push(Op::Load {
            dests,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx
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

/// Commits `batch` as one transaction; if that fails, retries once after a
/// pause, then write by write so one bad write cannot fail its neighbours.
/// Then brings the quota up to date and answers every op.
fn commit(
    pool: &Pool,
    metrics: &Metrics,
    quota: &Quota,
    keys: Option<&StorageKeys>,
    batch: &mut Vec<Op>,
) {
    let started = Instant::now();
    let mut outcome = apply(pool, keys, batch);
    if outcome.is_err() {
        thread::sleep(RETRY_PAUSE);
        outcome = apply(pool, keys, batch);
    }
    let results: Vec<Result<Outcome, ()>> = match outcome {
        Ok(changed) => {
            log::trace!(
                "mailbox batch of {} committed in {:?}",
                batch.len(),
                started.elapsed()
            );
            changed.into_iter().map(Ok).collect()
        }
        Err(e) => {
            log::error!(
                "mailbox batch of {} failed ({e}); retrying one by one",
                batch.len()
            );
            batch
                .iter()
                .map(|op| {
                    apply(pool, keys, std::slice::from_ref(op))
                        .map(|v| v.first().copied().unwrap_or(Outcome::Absent))
                        .map_err(|e| log::error!("mailbox write failed: {e}"))
                })
                .collect()
        }
    };
    quota.committed(&changes(batch, &results));
    load_counts(pool, quota, batch);
    finish(metrics, batch.drain(..).zip(results));
}

/// What the batch changed in the devices' stored counts.
fn changes(batch: &[Op], results: &[Result<Outcome, ()>]) -> Vec<Change> {
    batch
        .iter()
        .zip(results)
        .filter_map(|(op, result)| match (op, result) {
            (Op::Spill { dest, envelope, .. }, Ok(Outcome::Stored)) => Some(Change::Stored {
                dest: *dest,
                took_slot: envelope.slot.take(),
            }),
            (Op::Delete { dest, .. }, Ok(Outcome::Deleted)) => Some(Change::Deleted(*dest)),
            _ => None,
        })
        .collect()
}

/// Serves the batch's `Load`s, after its commit (so the counts read include
/// it, and every later commit adjusts them).
fn load_counts(pool: &Pool, quota: &Quota, batch: &[Op]) {
    let dests: Vec<Address> = batch
        .iter()
        .flat_map(|op| match op {
            Op::Load { dests, .. } => dests.as_slice(),
            _ => &[],
        })
        .copied()
        .collect();
    if dests.is_empty() {
        return;
    }
    let counts = pool
        .get()
        .map_err(store::StoreError::from)
        .and_then(|mut conn| store::mailbox::counts(&mut conn, &dests));
    match counts {
        Ok(counts) => quota.loaded(&counts),
        // The senders waiting on these are refused (the counts stay unknown).
        Err(e) => log::error!("cannot read mailbox counts: {e}"),
    }
}

/// Applies every write of `ops` (barriers and loads are no-ops) in one
/// transaction; returns one outcome per op.
fn apply(
    pool: &Pool,
    keys: Option<&StorageKeys>,
    ops: &[Op],
) -> Result<Vec<Outcome>, store::StoreError> {
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
            Op::Barrier(_) | Op::Load { .. } => None,
        })
        .collect();
    let mut changed = if writes.is_empty() {
        Vec::new()
    } else {
        let mut conn = pool.get()?;
        store::mailbox::apply(&mut conn, &writes, keys)?
    }
    .into_iter();
    Ok(ops
        .iter()
        .map(|op| match op {
            Op::Barrier(_) | Op::Load { .. } => Outcome::Absent,
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
            Op::Barrier(done) | Op::Load { done, .. } => done(result),
        }
    }
}
