//! `Router`: the map from `(account, device)` to the live session.
//!
//! It routes each copy to the device's session or, when the device is not
//! connected, spills it to the mailbox writer (in a cluster: hands it to
//! the relay, which finds the device's node); it replaces an older session
//! of the same device, here or (through the relay) on another node; it
//! records which devices this node holds in the cluster's presence; it
//! drains every session at shutdown. It owns nothing else, never touches
//! the database, and knows sessions only as the `Recipient`s of the
//! messages it sends them ([`messages`]).

pub mod live;
pub mod messages;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, Addr, Context, Handler, ResponseActFuture, ResponseFuture, WrapFuture,
};
use tokio::sync::oneshot;

pub use live::Live;
pub use messages::*;

use super::mailbox::{MailboxWriter, StorageFailed};
use super::push::{Pusher, Reset, Wake};
use super::questions::{Ask, Questions};
use super::relay::{Forward, Relay};
use crate::cluster::packet::Packet;
use crate::cluster::{Bus, Holder};
use crate::domain::address::Address;
use crate::domain::envelope::Envelope;
use crate::metrics::Metrics;
use crate::wire::DeliveryStatus;

/// The answer for one routed copy.
pub type RouteReply = oneshot::Sender<Result<DeliveryStatus, StorageFailed>>;

/// How long a new connection waits for the session it replaces to spill
/// before it reads the mailbox anyway. Sessions run on their own (a stalled
/// socket cannot freeze them), so this bounds only a pathological case; a
/// copy spilled later is pushed on the device's next connection.
const REPLACE_GRACE: Duration = Duration::from_secs(1);

struct Entry {
    id: u64,
    session: SessionHandle,
    /// Resolves once that session has spilled its unacknowledged copies.
    settled: Option<oneshot::Receiver<()>>,
}

/// What the router needs of the cluster, when this node is a member.
struct Membership {
    bus: Arc<dyn Bus>,
    relay: Addr<Relay>,
    questions: Addr<Questions>,
}

impl Membership {
    fn holder(&self, conn: u64) -> Holder {
        Holder {
            node: self.bus.node(),
            conn,
        }
    }
}

pub struct Router {
    sessions: HashMap<Address, Entry>,
    writer: MailboxWriter,
    metrics: Metrics,
    draining: bool,
    cluster: Option<Membership>,
    /// Told of each copy stored for a device connected nowhere.
    pusher: Addr<Pusher>,
    /// `sessions` as the send path sees it: every change to `sessions` is
    /// made here first (see [`Live`] for why the order matters).
    live: Live,
}

impl Router {
    pub fn new(writer: MailboxWriter, metrics: Metrics, pusher: Addr<Pusher>, live: Live) -> Self {
        Router {
            sessions: HashMap::new(),
            writer,
            metrics,
            draining: false,
            cluster: None,
            pusher,
            live,
        }
    }

    /// Unregisters `address`'s session. Whatever is sent to it afterwards
    /// (a `Close`) reaches it after every copy a sender queued to it.
    fn remove(&mut self, address: &Address) -> Option<Entry> {
        self.live.write().remove(address);
        self.unregister(address)
    }

    /// [`Self::remove`] but for [`Live`], which the caller has updated.
    fn unregister(&mut self, address: &Address) -> Option<Entry> {
        let entry = self.sessions.remove(address);
        if let Some(e) = &entry {
            self.metrics.connected_devices.dec();
            if let Some(cluster) = &self.cluster {
                // Only if no newer connection claimed the device since.
                let release = cluster.bus.release(*address, cluster.holder(e.id));
                let metrics = self.metrics.clone();
                actix::spawn(async move {
                    if release.await.is_err() {
                        metrics.bus_errors.inc();
                    }
                });
            }
        }
        entry
    }

    /// Stores a copy for an absent device (or drops it, if ephemeral).
    /// Alone (no cluster), a device not connected here is connected
    /// nowhere: once its copy is committed, the pusher may wake it. (In a
    /// cluster the relay knows that, not the router.)
    fn spill(&self, dest: Address, envelope: Arc<Envelope>, ephemeral: bool, reply: RouteReply) {
        if ephemeral {
            self.metrics.messages_dropped.inc();
            let _ = reply.send(Ok(DeliveryStatus::Dropped));
            return;
        }
        if self.cluster.is_none() && !self.sessions.contains_key(&dest) {
            let pusher = self.pusher.clone();
            self.writer
                .spill_answering_then(dest, envelope, reply, move || {
                    pusher.do_send(Wake { device: dest })
                });
        } else {
            self.writer.spill_answering(dest, envelope, reply);
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Handler<Connect> for Router {
    type Result = Option<Settled>;

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) -> Self::Result {
        if self.draining {
            return None;
        }
        // The new session takes the device over for the send path first;
        // then everything spilled for the device before now (by this
        // router, or by a sender that found it absent) must be committed
        // before the new session reads the mailbox.
        self.live
            .write()
            .insert(msg.address, msg.session.deliver.clone());
        let barrier = self.writer.barrier();
        let previous = self.unregister(&msg.address);
        self.sessions.insert(
            msg.address,
            Entry {
                id: msg.id,
                session: msg.session,
                settled: Some(msg.settled),
            },
        );
        self.metrics.connected_devices.inc();
        // Back: the next copy it misses once gone again may wake it at once.
        self.pusher.do_send(Reset {
            device: msg.address,
        });
        let previous_settled = previous.and_then(|mut old| {
            log::info!(
                "{} connected elsewhere; replacing session {}",
                msg.address,
                old.id
            );
            old.session.close.do_send(Close::Replaced);
            old.settled.take()
        });
        // In a cluster: record this connection as the device's one, and
        // have the one it replaces on another node (if any) close and spill.
        let elsewhere = self.cluster.as_ref().map(|cluster| {
            let claim = cluster.bus.claim(msg.address, cluster.holder(msg.id));
            let (questions, node, address) =
                (cluster.questions.clone(), cluster.bus.node(), msg.address);
            let metrics = self.metrics.clone();
            async move {
                match claim.await {
                    Ok(Some(holder)) if holder.node != node => {
                        log::info!(
                            "{address} connected here; replacing its connection on node {}",
                            holder.node
                        );
                        // No answer (that node is gone, or slow): go on; what
                        // it held was stored by the nodes that had sent it.
                        let _ = questions
                            .send(Ask {
                                node: holder.node,
                                question: Box::new(move |id| Packet::Evict {
                                    from: node,
                                    id,
                                    device: address.into(),
                                    conn: holder.conn,
                                }),
                                grace: REPLACE_GRACE,
                            })
                            .await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        metrics.bus_errors.inc();
                        log::warn!("{e}; {address} is connected here unannounced");
                    }
                }
            }
        });
        Some(Box::pin(async move {
            let _ = barrier.await;
            if let Some(settled) = previous_settled {
                // An error means the old session is gone; it spilled when it stopped.
                let _ = tokio::time::timeout(REPLACE_GRACE, settled).await;
            }
            if let Some(elsewhere) = elsewhere {
                elsewhere.await;
            }
        }))
    }
}

impl Handler<Disconnect> for Router {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        if self.sessions.get(&msg.address).map(|e| e.id) == Some(msg.id) {
            self.remove(&msg.address);
        }
    }
}

impl Handler<Route> for Router {
    type Result = ();

    fn handle(&mut self, msg: Route, _: &mut Context<Self>) {
        if let Some(entry) = self.sessions.get(&msg.dest).filter(|_| !self.draining) {
            // If the session dies with this message in its queue, the reply
            // is dropped unanswered and whoever routed it stores the copy.
            entry.session.deliver.do_send(Deliver {
                envelope: msg.envelope,
                ephemeral: msg.ephemeral,
                reply: msg.reply,
            });
            return;
        }
        match (&self.cluster, msg.via) {
            // Not here: the node that forwarded it routes it again.
            (_, Via::Forwarded) => drop(msg.reply),
            (Some(cluster), Via::Accepted | Via::Rerouted) if !self.draining => {
                cluster.relay.do_send(Forward {
                    dest: msg.dest,
                    envelope: msg.envelope,
                    ephemeral: msg.ephemeral,
                    reply: msg.reply,
                    last_try: msg.via == Via::Rerouted,
                })
            }
            _ => self.spill(msg.dest, msg.envelope, msg.ephemeral, msg.reply),
        }
    }
}

impl Handler<Join> for Router {
    type Result = ();

    fn handle(&mut self, msg: Join, _: &mut Context<Self>) {
        self.cluster = Some(Membership {
            bus: msg.bus,
            relay: msg.relay,
            questions: msg.questions,
        });
    }
}

impl Handler<EvictLocal> for Router {
    type Result = Option<Settled>;

    fn handle(&mut self, msg: EvictLocal, _: &mut Context<Self>) -> Self::Result {
        // A later connection here than the one displaced stays.
        if self.sessions.get(&msg.address).map(|e| e.id) != Some(msg.conn) {
            return None;
        }
        self.live.write().remove(&msg.address);
        let mut entry = self.sessions.remove(&msg.address)?;
        self.metrics.connected_devices.dec();
        log::info!(
            "{} connected on another node; replacing session {}",
            msg.address,
            entry.id
        );
        entry.session.close.do_send(Close::Replaced);
        let settled = entry.settled.take()?;
        Some(Box::pin(async move {
            let _ = settled.await;
        }))
    }
}

impl Handler<RescanAt> for Router {
    type Result = ();

    fn handle(&mut self, msg: RescanAt, _: &mut Context<Self>) {
        match msg.address {
            Some(address) => {
                if let Some(entry) = self.sessions.get(&address) {
                    entry.session.rescan.do_send(Rescan);
                }
            }
            None => {
                for entry in self.sessions.values() {
                    entry.session.rescan.do_send(Rescan);
                }
            }
        }
    }
}

impl Handler<LocalSessions> for Router {
    type Result = Vec<(Address, u64)>;

    fn handle(&mut self, _: LocalSessions, _: &mut Context<Self>) -> Self::Result {
        self.sessions.iter().map(|(a, e)| (*a, e.id)).collect()
    }
}

impl Handler<AckAt> for Router {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: AckAt, _: &mut Context<Self>) -> Self::Result {
        let asked = self
            .sessions
            .get(&msg.dest)
            .map(|e| e.session.ack.send(AckLive { guid: msg.guid }));
        Box::pin(async move {
            match asked {
                Some(answer) => answer.await.unwrap_or(false),
                None => false,
            }
        })
    }
}

impl Handler<CloseDevices> for Router {
    type Result = ();

    fn handle(&mut self, msg: CloseDevices, _: &mut Context<Self>) {
        let doomed: Vec<Address> = self
            .sessions
            .keys()
            .filter(|a| a.account == msg.account && msg.device.is_none_or(|d| a.device == d))
            .copied()
            .collect();
        for address in doomed {
            if let Some(entry) = self.remove(&address) {
                entry.session.close.do_send(Close::Removed);
            }
        }
    }
}

impl Handler<Drain> for Router {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        let mut waits = Vec::with_capacity(self.sessions.len());
        let addresses: Vec<Address> = self.sessions.keys().copied().collect();
        for address in addresses {
            let Some(mut entry) = self.remove(&address) else {
                continue;
            };
            entry.session.close.do_send(Close::Draining);
            if let Some(settled) = entry.settled.take() {
                waits.push(settled);
            }
        }
        log::info!("draining {} live sessions", waits.len());
        Box::pin(
            async move {
                futures_util::future::join_all(waits).await;
            }
            .into_actor(self)
            .map(|_, _, _| ()),
        )
    }
}

impl Handler<ConnectedCount> for Router {
    type Result = usize;

    fn handle(&mut self, _: ConnectedCount, _: &mut Context<Self>) -> usize {
        self.sessions.len()
    }
}
