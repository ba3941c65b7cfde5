//! `KeysActor`: owns every prekey read and write, on a dedicated thread,
//! so bundle fetches are serialised in this process and never contend for
//! the same one-time key.
//!
//! It is an actor in the plain sense (private state, one mailbox, one
//! message at a time) but not an actix `SyncArbiter` one: it takes every
//! request queued at that moment and runs them in ONE transaction (uploads
//! each in a savepoint, so a refused one rolls back alone), then answers
//! them all after the commit. A request that fails fails the batch. On SQLite with
//! `synchronous=FULL` a commit costs an fsync, so one transaction per fetch
//! would cap bundles at a few hundred a second; group commit pays that once
//! per batch (figures in BENCHMARKS.md). Nobody is answered before the
//! commit, so a handed-out key is durably gone.
//!
//! On PostgreSQL the actor is split into [`PG_SHARDS`] shards, each its own
//! thread, queue and connection, and an account always maps to the same
//! shard: every key operation on one account is still serialised in this
//! process, while fetches for different accounts no longer wait for each
//! other's round trips (one shard kept the database half idle; see
//! BENCHMARKS.md). SQLite has one writer at a time anyway, so it keeps one
//! shard.
//!
//! The at-most-once guarantee itself is the store's
//! (`store::keys::take_bundle` deletes each key as it reads it, and on
//! PostgreSQL picks it `FOR UPDATE SKIP LOCKED`), so it holds across shards
//! and across processes sharing one PostgreSQL database too.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::group_commit::GroupCommit;
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::prekeys::{Bundle, KeySet, UploadRefusal};
use crate::store::{self, Pool, StoreError};

/// Requests taken into one transaction at most.
const MAX_BATCH: usize = 256;

/// Shards on PostgreSQL (each holds one pooled connection while it works).
pub const PG_SHARDS: usize = 4;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Messages to the keys actor (from `service::keys`).
enum KeysRequest {
    /// Store a verified upload for `address`.
    Store {
        address: Address,
        keys: KeySet,
        reply: Reply<Result<(), UploadRefusal>>,
    },
    /// One-time keys left, `(count, pqCount)`.
    Count {
        address: Address,
        reply: Reply<(i64, i64)>,
    },
    /// Build, and consume one-time keys for, a bundle (`device: None`: all).
    Take {
        account: AccountId,
        device: Option<DeviceId>,
        reply: Reply<Option<Bundle>>,
    },
}

/// Handle to the keys actor; cheap to clone. The threads end when every
/// handle is dropped.
#[derive(Clone)]
pub struct KeysActor {
    shards: Arc<[GroupCommit<KeysRequest>]>,
}

impl KeysActor {
    /// Starts `shards` threads (at least one): 1 on SQLite, [`PG_SHARDS`] on PostgreSQL.
    pub fn start(pool: Pool, max_one_time_keys: u64, shards: usize) -> KeysActor {
        let shards: Arc<[_]> = (0..shards.max(1))
            .map(|i| {
                let pool = pool.clone();
                let (shard, _) =
                    GroupCommit::start(format!("keys-actor-{i}"), MAX_BATCH, move |batch| {
                        let requests = std::mem::take(batch);
                        if let Err(e) = serve_batch(&pool, max_one_time_keys, requests) {
                            log::error!("keys batch failed: {e}");
                        }
                    });
                shard
            })
            .collect();
        KeysActor { shards }
    }

    /// The shard that owns `account`: account ids are random UUIDs, so their
    /// low bits spread accounts evenly.
    fn shard(&self, account: &AccountId) -> &GroupCommit<KeysRequest> {
        let n = self.shards.len() as u128;
        &self.shards[(account.0.as_u128() % n) as usize]
    }

    async fn ask<T>(
        &self,
        account: &AccountId,
        make: impl FnOnce(Reply<T>) -> KeysRequest,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.shard(account)
            .push(make(reply))
            .map_err(|_| StoreError::Stopped("keys actor"))?;
        answer
            .await
            .map_err(|_| StoreError::Stopped("keys actor"))?
    }

    pub async fn store(
        &self,
        address: Address,
        keys: KeySet,
    ) -> Result<Result<(), UploadRefusal>, StoreError> {
        self.ask(&address.account, |reply| KeysRequest::Store {
            address,
            keys,
            reply,
        })
        .await
    }

    pub async fn count(&self, address: Address) -> Result<(i64, i64), StoreError> {
        self.ask(&address.account, |reply| KeysRequest::Count {
            address,
            reply,
        })
        .await
    }

    pub async fn take(
        &self,
        account: AccountId,
        device: Option<DeviceId>,
    ) -> Result<Option<Bundle>, StoreError> {
        self.ask(&account, |reply| KeysRequest::Take {
            account,
            device,
            reply,
        })
        .await
    }
}

/// An answer computed inside the transaction, sent only after the commit.
enum Answer {
    Store(
        Reply<Result<(), UploadRefusal>>,
        Result<Result<(), UploadRefusal>, StoreError>,
    ),
    Count(Reply<(i64, i64)>, Result<(i64, i64), StoreError>),
    Take(Reply<Option<Bundle>>, Result<Option<Bundle>, StoreError>),
}

impl Answer {
    fn send(self) {
        match self {
            Answer::Store(reply, r) => drop(reply.send(r)),
            Answer::Count(reply, r) => drop(reply.send(r)),
            Answer::Take(reply, r) => drop(reply.send(r)),
        }
    }

    /// Whether the request failed (not: was refused).
    fn failed(&self) -> bool {
        match self {
            Answer::Store(_, r) => r.is_err(),
            Answer::Count(_, r) => r.is_err(),
            Answer::Take(_, r) => r.is_err(),
        }
    }

    /// The batch did not commit: whatever was computed is void.
    fn fail(self, why: &str) {
        log::error!("keys request failed: {why}");
        match self {
            Answer::Store(reply, _) => drop(reply.send(Err(StoreError::Stopped("keys batch")))),
            Answer::Count(reply, _) => drop(reply.send(Err(StoreError::Stopped("keys batch")))),
            Answer::Take(reply, _) => drop(reply.send(Err(StoreError::Stopped("keys batch")))),
        }
    }
}

fn serve_batch(
    pool: &Pool,
    max_one_time_keys: u64,
    requests: Vec<KeysRequest>,
) -> Result<(), StoreError> {
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(e) => {
            let why = e.to_string();
            for r in requests {
                answer_without_running(r).fail(&why);
            }
            return Err(e.into());
        }
    };
    let mut answers = Vec::with_capacity(requests.len());
    let mut rest = requests.into_iter();
    let committed = store::write_batch(&mut conn, |conn| {
        for request in rest.by_ref() {
            // Uploads open their own (nested) transaction, so a refused one
            // rolls back alone. A request that FAILS fails the batch: on
            // PostgreSQL a failed statement outside a savepoint (a bundle
            // fetch has none) aborts the whole transaction, so nothing of the
            // batch can be committed, and nobody may be told otherwise.
            let answer = run_one(conn, max_one_time_keys, request);
            let failed = answer.failed();
            answers.push(answer);
            if failed {
                return Err(StoreError::Stopped("keys batch (a request in it failed)"));
            }
        }
        Ok(())
    });
    match committed {
        Ok(()) => answers.into_iter().for_each(Answer::send),
        Err(e) => {
            let why = e.to_string();
            answers.into_iter().for_each(|a| a.fail(&why));
            rest.for_each(|r| answer_without_running(r).fail(&why));
            return Err(e);
        }
    }
    Ok(())
}

/// Runs one request inside the batch's transaction.
fn run_one(conn: &mut store::Conn, max_one_time_keys: u64, request: KeysRequest) -> Answer {
    match request {
        KeysRequest::Store {
            address,
            keys,
            reply,
        } => Answer::Store(
            reply,
            store::keys::store_keys(conn, address, &keys, max_one_time_keys),
        ),
        KeysRequest::Count { address, reply } => {
            Answer::Count(reply, store::keys::count_one_time_keys(conn, address))
        }
        KeysRequest::Take {
            account,
            device,
            reply,
        } => Answer::Take(reply, store::keys::take_bundle(conn, account, device)),
    }
}

fn answer_without_running(request: KeysRequest) -> Answer {
    let gone = || StoreError::Stopped("database");
    match request {
        KeysRequest::Store { reply, .. } => Answer::Store(reply, Err(gone())),
        KeysRequest::Count { reply, .. } => Answer::Count(reply, Err(gone())),
        KeysRequest::Take { reply, .. } => Answer::Take(reply, Err(gone())),
    }
}
