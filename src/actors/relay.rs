//! `Relay`: copies for devices connected to other nodes. One job: keep each
//! forwarded copy until the node holding its device answers for it, or
//! store it when the answer does not come. (Other questions to other
//! nodes are `actors::questions`.)
//!
//! The router hands it each copy for a device it does not
//!   hold. The relay asks the bus where the device is (a batch of copies per
//!   round trip, in the order they came, so per-source order holds) and
//!   forwards the copy to that node, keeping it until that node confirms an
//!   ack or a commit. With no confirmation in time, or nobody listening on
//!   that node's channel, it stores the copy itself (idempotent by guid: if
//!   the other node stored it too, the mailbox keeps one; if the device got
//!   it too, the client drops the duplicate by guid). A copy for a device
//!   connected nowhere is stored at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, WrapFuture};
use tokio::sync::oneshot;

use super::mailbox::{spill_status, MailboxWriter};
use super::push::{Pusher, Wake};
use super::router::{Route, RouteReply, Router, Via};
use crate::cluster::packet::{Confirmation, Packet};
use crate::cluster::{Bus, BusError, Holder, NodeId};
use crate::domain::address::Address;
use crate::domain::envelope::Envelope;
use crate::metrics::Metrics;
use crate::wire::DeliveryStatus;

/// How often unconfirmed forwards are checked against their deadline.
const DEADLINE_TICK: Duration = Duration::from_millis(100);
/// Copies located and forwarded per bus round trip at most.
const MAX_BATCH: usize = 512;

/// From the router: a copy for a device not connected here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forward {
    pub dest: Address,
    pub envelope: Arc<Envelope>,
    pub ephemeral: bool,
    pub reply: RouteReply,
    /// Already bounced once (`NotHere`): store it rather than chase it again.
    pub last_try: bool,
}

/// From the node's dispatcher: what became of a forwarded copy.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Confirmed {
    pub id: u64,
    pub what: Confirmation,
}

struct Pending {
    dest: Address,
    envelope: Arc<Envelope>,
    ephemeral: bool,
    reply: RouteReply,
    holder: Holder,
    last_try: bool,
}

pub struct Relay {
    bus: Arc<dyn Bus>,
    node: NodeId,
    writer: MailboxWriter,
    router: Addr<Router>,
    /// Told of each copy stored for a device connected nowhere.
    pusher: Addr<Pusher>,
    metrics: Metrics,
    /// How long a forwarded copy may go unconfirmed.
    confirm_timeout: Duration,
    next_id: u64,
    queue: Vec<Forward>,
    /// A batch is being located or sent: the next one waits (order).
    busy: bool,
    pending: HashMap<u64, Pending>,
    deadlines: VecDeque<(Instant, u64)>,
}

impl Relay {
    pub fn new(
        bus: Arc<dyn Bus>,
        writer: MailboxWriter,
        router: Addr<Router>,
        pusher: Addr<Pusher>,
        metrics: Metrics,
        ack_timeout: Duration,
    ) -> Self {
        Relay {
            node: bus.node(),
            bus,
            writer,
            router,
            pusher,
            metrics,
            // The holder answers after the ack, or after its own spill once
            // the ack timeout ran out: allow for both, and for a busy node.
            confirm_timeout: ack_timeout * 2 + Duration::from_secs(2),
            next_id: 0,
            queue: Vec::new(),
            busy: false,
            pending: HashMap::new(),
            deadlines: VecDeque::new(),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Stores a copy this node accepted (or, if ephemeral, drops it).
    fn spill(&self, dest: Address, envelope: Arc<Envelope>, ephemeral: bool, reply: RouteReply) {
        if ephemeral {
            self.metrics.messages_dropped.inc();
            let _ = reply.send(Ok(DeliveryStatus::Dropped));
        } else {
            self.writer.spill_answering(dest, envelope, reply);
        }
    }

    /// Stores a copy for a device the bus says is connected nowhere (or
    /// drops it, if ephemeral); once it is committed, the pusher may wake
    /// the device. Not for fallback spills: their device may be connected.
    fn spill_away(&self, f: Forward) {
        if f.ephemeral {
            return self.spill(f.dest, f.envelope, f.ephemeral, f.reply);
        }
        let (pusher, device) = (self.pusher.clone(), f.dest);
        self.writer
            .spill_answering_then(f.dest, f.envelope, f.reply, move || {
                pusher.do_send(Wake { device })
            });
    }

    /// The fallback: no (usable) answer from the holder.
    fn spill_pending(&self, p: Pending) {
        self.metrics.cluster_fallback_spills.inc();
        self.spill(p.dest, p.envelope, p.ephemeral, p.reply);
    }

    /// The fallback for a copy whose holder heard it but did not confirm in
    /// time: store it, and once it is committed tell the holder, whose
    /// connection may still be live and would otherwise see the copy only
    /// on its next connection.
    fn spill_overdue(&self, p: Pending) {
        if p.ephemeral {
            return self.spill_pending(p);
        }
        self.metrics.cluster_fallback_spills.inc();
        let (stored_tx, stored) = oneshot::channel();
        let reply = p.reply;
        self.writer.spill_then(
            p.dest,
            p.envelope,
            Box::new(move |outcome| {
                let ok = outcome.is_ok();
                let _ = reply.send(spill_status(outcome));
                let _ = stored_tx.send(ok);
            }),
        );
        let (bus, holder, device) = (self.bus.clone(), p.holder, p.dest);
        actix::spawn(async move {
            if stored.await == Ok(true) {
                let poke = Packet::Stored {
                    device: device.into(),
                };
                let _ = bus.send(vec![(holder.node, poke)]).await;
            }
        });
    }

    /// Locates and forwards the queued copies, one batch at a time.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.queue.is_empty() {
            return;
        }
        self.busy = true;
        let take = self.queue.len().min(MAX_BATCH);
        let batch: Vec<Forward> = self.queue.drain(..take).collect();
        let dests = batch.iter().map(|f| f.dest).collect();
        let located = self.bus.locate(dests);
        ctx.spawn(located.into_actor(self).then(move |holders, act, _| {
            let located = holders.is_ok();
            let holders = holders.unwrap_or_else(|e| {
                act.bus_failed(&e);
                Vec::new()
            });
            let mut sent = Vec::new();
            let mut packets = Vec::new();
            for (i, f) in batch.into_iter().enumerate() {
                match holders.get(i).copied().flatten() {
                    // Connected on another node.
                    Some(holder) if holder.node != act.node => {
                        let id = act.id();
                        packets.push((
                            holder.node,
                            Packet::Forward {
                                from: act.node,
                                id,
                                dest: f.dest.into(),
                                envelope: f.envelope.as_ref().into(),
                                ephemeral: f.ephemeral,
                            },
                        ));
                        act.pending.insert(
                            id,
                            Pending {
                                dest: f.dest,
                                envelope: f.envelope,
                                ephemeral: f.ephemeral,
                                reply: f.reply,
                                holder,
                                last_try: f.last_try,
                            },
                        );
                        sent.push(id);
                    }
                    // Connected nowhere (or here a moment ago, now gone):
                    // the mailbox, and a push.
                    _ if located => act.spill_away(f),
                    // The bus cannot say: the mailbox; no push, the device
                    // may be connected elsewhere.
                    _ => act.spill(f.dest, f.envelope, f.ephemeral, f.reply),
                }
            }
            act.metrics.cluster_forwards.inc_by(sent.len() as u64);
            act.bus
                .send(packets)
                .into_actor(act)
                .map(move |heard, act, ctx| {
                    let heard = heard.unwrap_or_else(|e| {
                        act.bus_failed(&e);
                        Vec::new()
                    });
                    let deadline = Instant::now() + act.confirm_timeout;
                    for (i, id) in sent.into_iter().enumerate() {
                        if heard.get(i).copied().unwrap_or(false) {
                            act.deadlines.push_back((deadline, id));
                        } else if let Some(p) = act.pending.remove(&id) {
                            // Nobody listens there: that node is gone (or cut
                            // off), and so is its presence record.
                            let release = act.bus.release(p.dest, p.holder);
                            actix::spawn(async move {
                                let _ = release.await;
                            });
                            act.spill_pending(p);
                        }
                    }
                    act.busy = false;
                    act.flush(ctx);
                })
        }));
    }

    fn bus_failed(&self, e: &BusError) {
        self.metrics.bus_errors.inc();
        log::warn!("{e}; acting alone");
    }

    /// Stores every forward whose confirmation is overdue.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(p) = self.pending.remove(&id) {
                log::debug!(
                    "no confirmation from {} in time; storing the copy",
                    p.holder.node
                );
                self.spill_overdue(p);
            }
        }
    }
}

impl Actor for Relay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(DEADLINE_TICK, |act, _| act.expire());
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for (_, p) in self.pending.drain() {
            self.metrics.cluster_fallback_spills.inc();
            if p.ephemeral {
                let _ = p.reply.send(Ok(DeliveryStatus::Dropped));
            } else {
                self.writer.spill_answering(p.dest, p.envelope, p.reply);
            }
        }
    }
}

impl Handler<Forward> for Relay {
    type Result = ();

    fn handle(&mut self, msg: Forward, ctx: &mut Context<Self>) {
        self.queue.push(msg);
        self.flush(ctx);
    }
}

impl Handler<Confirmed> for Relay {
    type Result = ();

    fn handle(&mut self, msg: Confirmed, _: &mut Context<Self>) {
        // Already stored by the fallback: a late answer changes nothing.
        let Some(p) = self.pending.remove(&msg.id) else {
            return;
        };
        let status = match msg.what {
            Confirmation::Delivered => DeliveryStatus::Delivered,
            Confirmation::Queued => DeliveryStatus::Queued,
            Confirmation::Dropped => DeliveryStatus::Dropped,
            Confirmation::NotHere if !p.last_try => {
                // It moved (or its connection just ended): route it again.
                self.router.do_send(Route {
                    dest: p.dest,
                    envelope: p.envelope,
                    ephemeral: p.ephemeral,
                    reply: p.reply,
                    via: Via::Rerouted,
                });
                return;
            }
            Confirmation::NotHere | Confirmation::Failed => {
                self.spill_pending(p);
                return;
            }
        };
        self.metrics.cluster_confirmations.inc();
        let _ = p.reply.send(Ok(status));
    }
}
