//! `Pusher`: wakes devices that are connected nowhere over Web Push
//! (SPEC "Push"). One job: deliveries to push services — which devices to
//! push now (coalescing), how many pushes run at once, and what a push
//! service's answer means for the subscription.
//!
//! The router (one node) and the relay (a cluster) send it [`Wake`] once a
//! copy for a device connected nowhere is committed. It never answers, and
//! nothing waits for it: a slow or hanging push service costs at most one
//! of [`MAX_IN_FLIGHT`] places, never a send's answer. Beyond that many
//! pushes in flight a wake is dropped and counted (`push_overflow_total`).
//!
//! Coalescing is per node, in memory: each node of a cluster pushes a
//! device at most once per window on its own, so a device may be woken
//! once per node that stores copies for it — harmless, and bounded.

mod net;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture};

pub use net::check_host;
use net::{Pushed, Sender};

use crate::domain::address::Address;
use crate::domain::push::Vapid;
use crate::metrics::Metrics;
use crate::store::{self, Pool};

/// Pushes running at once, at most (subscription lookups included).
pub const MAX_IN_FLIGHT: usize = 64;

/// From the router or relay: a copy for `device`, which is connected
/// nowhere, was committed to its mailbox.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wake {
    pub device: Address,
}

/// From the router or the push service: `device` connected, or changed its
/// subscription; the next copy it misses pushes at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reset {
    pub device: Address,
}

pub struct Pusher {
    pool: Pool,
    metrics: Metrics,
    sender: Arc<Sender>,
    /// At most one push per device per this long.
    coalesce: Duration,
    /// When each device was last pushed (or found without a subscription).
    last: HashMap<Address, Instant>,
    in_flight: usize,
}

impl Pusher {
    /// `subject`: the VAPID `sub` claim; `allow_insecure` (tests only):
    /// `http://` and special addresses allowed.
    pub fn new(
        pool: Pool,
        metrics: Metrics,
        vapid: Vapid,
        subject: String,
        allow_insecure: bool,
        coalesce: Duration,
    ) -> Result<Pusher, reqwest::Error> {
        Ok(Pusher {
            pool,
            metrics,
            sender: Arc::new(Sender::new(vapid, subject, allow_insecure)?),
            coalesce,
            last: HashMap::new(),
            in_flight: 0,
        })
    }
}

impl Actor for Pusher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Forget devices whose window has passed: they push again anyway.
        ctx.run_interval(self.coalesce, |act, _| {
            let coalesce = act.coalesce;
            act.last.retain(|_, at| at.elapsed() < coalesce);
        });
    }
}

impl Handler<Wake> for Pusher {
    type Result = ();

    fn handle(&mut self, msg: Wake, ctx: &mut Context<Self>) {
        let device = msg.device;
        if self
            .last
            .get(&device)
            .is_some_and(|at| at.elapsed() < self.coalesce)
        {
            self.metrics.push_coalesced.inc();
            return;
        }
        if self.in_flight >= MAX_IN_FLIGHT {
            self.metrics.push_overflow.inc();
            return;
        }
        self.last.insert(device, Instant::now());
        self.in_flight += 1;
        let (pool, metrics, sender) =
            (self.pool.clone(), self.metrics.clone(), self.sender.clone());
        let push = async move { push(&pool, &metrics, &sender, device).await };
        ctx.spawn(push.into_actor(self).map(|_, act, _| act.in_flight -= 1));
    }
}

impl Handler<Reset> for Pusher {
    type Result = ();

    fn handle(&mut self, msg: Reset, _: &mut Context<Self>) {
        self.last.remove(&msg.device);
    }
}

/// Looks up `device`'s subscription and pushes it; a subscription its push
/// service says is gone is deleted (if the device did not replace it since).
async fn push(pool: &Pool, metrics: &Metrics, sender: &Sender, device: Address) {
    let found = store::blocking(pool, move |conn| {
        store::push::find_subscription(conn, device)
    })
    .await;
    let sub = match found {
        Ok(Some(sub)) => sub,
        Ok(None) => return,
        Err(e) => {
            metrics.push_failed.inc();
            log::warn!("cannot read the push subscription of {device}: {e}");
            return;
        }
    };
    match sender.push(&sub).await {
        Pushed::Sent => {
            metrics.push_sent.inc();
            log::debug!("pushed a wake to {device}");
        }
        Pushed::Failed => metrics.push_failed.inc(),
        Pushed::Gone => {
            metrics.push_failed.inc();
            let endpoint = sub.endpoint;
            let deleted = store::blocking(pool, move |conn| {
                store::push::delete_subscription(conn, device, Some(&endpoint))
            })
            .await;
            match deleted {
                Ok(true) => {
                    metrics.push_subscriptions_dropped.inc();
                    log::info!("push subscription of {device} is gone; deleted it");
                }
                Ok(false) => {}
                Err(e) => log::warn!("cannot delete the push subscription of {device}: {e}"),
            }
        }
    }
}
