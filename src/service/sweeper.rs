//! `Sweeper`: on an interval, deletes mailbox copies past retention and
//! expired provisioning codes; every minute, forgets the rate-limit keys
//! whose buckets are full again. The database work runs on the blocking
//! pool, never on this actor's thread.

use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, ResponseFuture};

use crate::error::ApiError;
use crate::service::state::State;
use crate::store;

/// Rows deleted per statement batch, so a sweep never holds the write lock long.
const SWEEP_BATCH: i64 = 5_000;
/// How often rate-limit keys whose buckets are full again are forgotten. An
/// in-memory pass, independent of the (longer) database sweep interval, so
/// a flood's keys go within minutes of it ending.
const LIMITER_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

pub struct Sweeper {
    state: State,
}

impl Sweeper {
    pub fn new(state: State) -> Self {
        Sweeper { state }
    }
}

impl Actor for Sweeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.state.config.sweep_interval(), |_, ctx| {
            ctx.address().do_send(Sweep);
        });
        ctx.run_interval(LIMITER_SWEEP_INTERVAL, |sweeper, _| {
            let evicted = sweeper.state.limits.evict_replenished();
            log::debug!("forgot {evicted} replenished rate-limit keys");
        });
    }
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired_messages: usize,
    pub expired_codes: usize,
    pub evicted_limiter_keys: usize,
}

/// Run one sweep now (the interval timer sends this too).
#[derive(Message)]
#[rtype(result = "Result<SweepReport, ApiError>")]
pub struct Sweep;

impl Handler<Sweep> for Sweeper {
    type Result = ResponseFuture<Result<SweepReport, ApiError>>;

    fn handle(&mut self, _: Sweep, _: &mut Context<Self>) -> Self::Result {
        let state = self.state.clone();
        Box::pin(async move { sweep(&state).await })
    }
}

pub async fn sweep(state: &State) -> Result<SweepReport, ApiError> {
    let retention_ms = i64::try_from(state.config.retention().as_millis()).unwrap_or(i64::MAX);
    let cutoff = store::now_ms().saturating_sub(retention_ms);
    let (expired_messages, expired_codes) = store::blocking(&state.pool, move |conn| {
        let mut messages = 0;
        loop {
            let n = store::mailbox::delete_expired(conn, cutoff, SWEEP_BATCH)?;
            messages += n;
            if (n as i64) < SWEEP_BATCH {
                break;
            }
        }
        // Multi-recipient payloads whose copies are all gone.
        store::mailbox::delete_orphaned_shared(conn, store::now_ms())?;
        let codes = store::accounts::sweep_provisioning_codes(conn, store::now_ms())?;
        Ok::<_, ApiError>((messages, codes))
    })
    .await?;
    state
        .metrics
        .messages_expired
        .inc_by(expired_messages as u64);
    let evicted_limiter_keys = state.limits.evict_replenished();
    let report = SweepReport {
        expired_messages,
        expired_codes,
        evicted_limiter_keys,
    };
    if expired_messages + expired_codes > 0 {
        log::info!("sweep: {report:?}");
    }
    Ok(report)
}
