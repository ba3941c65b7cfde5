//! `Questions`: this node's questions to other nodes that wait for an
//! answer packet (`Ask`: evicting a device's connection there, joining a
//! rendezvous channel held there) or for every node's answer (`Announce`:
//! a change to an account's devices). One job: keep each question until
//! its answers come or its time is up, so the asker is never left waiting.
//!
//! - **Evictions.** A new connection here displaces the device's connection
//!   on another node: that node closes it with 4409, spills what it held,
//!   and answers `Evicted`; the new connection waits (bounded) before it
//!   replays.
//! - **Announcements.** A change to an account's devices is told to every
//!   node, and the change is answered once each has applied it (bounded).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseFuture, WrapFuture,
};
use tokio::sync::oneshot;

use crate::cluster::packet::{Packet, Removed};
use crate::cluster::{Bus, BusError, NodeId};
use crate::domain::address::AccountId;
use crate::metrics::Metrics;

/// From the accounts service: tell every node about a change to
/// `account`'s devices; resolves when all have applied it, or after `grace`.
#[derive(Message)]
#[rtype(result = "Result<(), BusError>")]
pub struct Announce {
    pub account: AccountId,
    pub removed: Option<Removed>,
    pub grace: Duration,
}

/// From the dispatcher: one node applied announcement `id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Applied {
    pub id: u64,
}

/// Acknowledgements of one announcement.
struct Tally {
    received: usize,
    /// Known once the broadcast says how many other nodes heard it.
    expected: Option<usize>,
    done: oneshot::Sender<()>,
}

impl Tally {
    fn complete(&self) -> bool {
        self.expected.is_some_and(|e| self.received >= e)
    }
}

pub struct Questions {
    bus: Arc<dyn Bus>,
    node: NodeId,
    metrics: Metrics,
    next_id: u64,
    tallies: HashMap<u64, Tally>,
    answers: HashMap<u64, oneshot::Sender<Packet>>,
}

impl Questions {
    pub fn new(bus: Arc<dyn Bus>, metrics: Metrics) -> Self {
        Questions {
            node: bus.node(),
            bus,
            metrics,
            next_id: 0,
            tallies: HashMap::new(),
            answers: HashMap::new(),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn bus_failed(&self, e: &BusError) {
        self.metrics.bus_errors.inc();
        log::warn!("{e}; acting alone");
    }
}

impl Actor for Questions {
    type Context = Context<Self>;
}

impl Handler<Announce> for Questions {
    type Result = ResponseFuture<Result<(), BusError>>;

    fn handle(&mut self, msg: Announce, ctx: &mut Context<Self>) -> Self::Result {
        let id = self.id();
        let (done, applied) = oneshot::channel();
        self.tallies.insert(
            id,
            Tally {
                received: 0,
                expected: None,
                done,
            },
        );
        let packet = Packet::Changed {
            from: self.node,
            id,
            account: msg.account.0,
            removed: msg.removed,
        };
        let (told_tx, told) = oneshot::channel();
        let sent = self.bus.broadcast(packet);
        ctx.spawn(sent.into_actor(self).map(move |heard, act, _| {
            match heard {
                // This node hears its own broadcast and does not answer it.
                Ok(n) => {
                    if let Some(t) = act.tallies.get_mut(&id) {
                        t.expected = Some(n.saturating_sub(1));
                    }
                    let _ = told_tx.send(Ok(()));
                }
                Err(e) => {
                    act.bus_failed(&e);
                    let _ = told_tx.send(Err(e));
                }
            }
            if act.tallies.get(&id).is_none_or(Tally::complete) {
                if let Some(t) = act.tallies.remove(&id) {
                    let _ = t.done.send(());
                }
            }
        }));
        let grace = msg.grace;
        let me = ctx.address();
        Box::pin(async move {
            let outcome = told.await.unwrap_or(Ok(()));
            if outcome.is_ok() && tokio::time::timeout(grace, applied).await.is_err() {
                log::warn!("a change was not confirmed by every node within {grace:?}");
                me.do_send(Forget { id });
            }
            outcome
        })
    }
}

impl Handler<Applied> for Questions {
    type Result = ();

    fn handle(&mut self, msg: Applied, _: &mut Context<Self>) {
        let complete = match self.tallies.get_mut(&msg.id) {
            Some(t) => {
                t.received += 1;
                t.complete()
            }
            None => false,
        };
        if complete {
            if let Some(t) = self.tallies.remove(&msg.id) {
                let _ = t.done.send(());
            }
        }
    }
}

/// A question to another node whose answer is a packet carrying the same
/// id (a rendezvous join, say): `question` builds it from the id. Resolves
/// with the answer, or `None` if it does not come within `grace` (or
/// nobody listens there).
#[derive(Message)]
#[rtype(result = "Option<Packet>")]
pub struct Ask {
    pub node: NodeId,
    pub question: Box<dyn FnOnce(u64) -> Packet + Send>,
    pub grace: Duration,
}

/// From the dispatcher: the answer to question `id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Answer {
    pub id: u64,
    pub packet: Packet,
}

impl Handler<Ask> for Questions {
    type Result = ResponseFuture<Option<Packet>>;

    fn handle(&mut self, msg: Ask, ctx: &mut Context<Self>) -> Self::Result {
        let id = self.id();
        let (answer_tx, answer) = oneshot::channel();
        self.answers.insert(id, answer_tx);
        let sent = self.bus.send(vec![(msg.node, (msg.question)(id))]);
        ctx.spawn(sent.into_actor(self).map(move |heard, act, _| {
            if !matches!(heard.as_deref(), Ok([true])) {
                // Dropping the sender resolves the question with `None`.
                act.answers.remove(&id);
            }
        }));
        let (grace, me) = (msg.grace, ctx.address());
        Box::pin(async move {
            match tokio::time::timeout(grace, answer).await {
                Ok(answer) => answer.ok(),
                Err(_) => {
                    me.do_send(Forget { id });
                    None
                }
            }
        })
    }
}

impl Handler<Answer> for Questions {
    type Result = ();

    fn handle(&mut self, msg: Answer, _: &mut Context<Self>) {
        if let Some(waiting) = self.answers.remove(&msg.id) {
            let _ = waiting.send(msg.packet);
        }
    }
}

/// A question given up on: drop what waits for it.
#[derive(Message)]
#[rtype(result = "()")]
struct Forget {
    id: u64,
}

impl Handler<Forget> for Questions {
    type Result = ();

    fn handle(&mut self, msg: Forget, _: &mut Context<Self>) {
        self.tallies.remove(&msg.id);
        self.answers.remove(&msg.id);
    }
}
