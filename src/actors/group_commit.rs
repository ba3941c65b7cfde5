//! `GroupCommit`: the shape both storage workers share (the mailbox writer
//! and each keys-actor shard). A dedicated OS thread takes everything queued
//! at that moment, up to a bound, and hands it to its handler as one batch,
//! which commits it in one transaction and answers each item only after the
//! commit. One fsync per batch instead of one per item is what makes both
//! fast on SQLite with `synchronous=FULL`; answering after the commit is
//! what makes their answers durable. Blocking work stays off the async
//! executors by construction.

use std::sync::mpsc;
use std::thread;

/// A handle to the worker thread; cheap to clone. The thread ends once every
/// handle is dropped and the queue is empty.
pub struct GroupCommit<T> {
    tx: mpsc::Sender<T>,
}

impl<T> Clone for GroupCommit<T> {
    fn clone(&self) -> Self {
        GroupCommit {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static> GroupCommit<T> {
    /// Starts the thread `name`. `handle` gets each batch (at most
    /// `max_batch` items, in queue order); whatever it leaves in the vector
    /// is dropped before the next batch.
    pub fn start<F>(name: String, max_batch: usize, mut handle: F) -> (Self, thread::JoinHandle<()>)
    where
        F: FnMut(&mut Vec<T>) + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<T>();
        let thread_name = name.clone();
        let join = thread::Builder::new()
            .name(name)
            .spawn(move || {
                let mut batch = Vec::with_capacity(max_batch);
                while let Ok(first) = rx.recv() {
                    batch.push(first);
                    while batch.len() < max_batch {
                        match rx.try_recv() {
                            Ok(item) => batch.push(item),
                            Err(_) => break,
                        }
                    }
                    handle(&mut batch);
                    batch.clear();
                }
                log::debug!("{thread_name} stopped");
            })
            .unwrap_or_else(|e| panic!("cannot spawn a storage worker thread: {e}"));
        (GroupCommit { tx }, join)
    }

    /// Queues `item`; gives it back if the thread has stopped.
    pub fn push(&self, item: T) -> Result<(), T> {
        self.tx.send(item).map_err(|mpsc::SendError(item)| item)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn hands_queued_items_over_in_batches_in_order() {
        let (seen_tx, seen) = mpsc::channel();
        let (gate_tx, gate) = mpsc::channel::<()>();
        let (worker, join) =
            GroupCommit::start("test-worker".into(), 3, move |batch: &mut Vec<u32>| {
                // Hold the first batch until the rest is queued.
                if batch[0] == 0 {
                    let _ = gate.recv_timeout(Duration::from_secs(5));
                }
                seen_tx.send(batch.clone()).unwrap();
            });
        for i in 0..5 {
            worker.push(i).unwrap();
        }
        gate_tx.send(()).unwrap();
        drop(worker);
        join.join().unwrap();
        let batches: Vec<Vec<u32>> = seen.iter().collect();
        assert_eq!(batches.concat(), vec![0, 1, 2, 3, 4]);
        assert!(batches.iter().all(|b| b.len() <= 3));
        assert!(batches.len() <= 3, "{batches:?}");
    }
}
