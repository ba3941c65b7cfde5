//! `Router`: the map from `(account, device)` to the live session.
//!
//! It routes each copy to the device's session or, when the device is not
//! connected, spills it to the mailbox writer; it replaces an older session
//! of the same device; it drains every session at shutdown. It owns nothing
//! else, never touches the database, and knows sessions only as the
//! `Recipient`s of the messages it sends them ([`messages`]).

pub mod messages;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, Context, Handler, ResponseActFuture, ResponseFuture, WrapFuture,
};
use tokio::sync::oneshot;

pub use messages::*;

use super::mailbox::{MailboxWriter, StorageFailed};
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

pub struct Router {
    sessions: HashMap<Address, Entry>,
    writer: MailboxWriter,
    metrics: Metrics,
    draining: bool,
}

impl Router {
    pub fn new(writer: MailboxWriter, metrics: Metrics) -> Self {
        Router {
            sessions: HashMap::new(),
            writer,
            metrics,
            draining: false,
        }
    }

    fn remove(&mut self, address: &Address) -> Option<Entry> {
        let entry = self.sessions.remove(address);
        if entry.is_some() {
            self.metrics.connected_devices.dec();
        }
        entry
    }

    /// Stores a copy for an absent device (or drops it, if ephemeral).
    fn spill(&self, dest: Address, envelope: Arc<Envelope>, ephemeral: bool, reply: RouteReply) {
        if ephemeral {
            self.metrics.messages_dropped.inc();
            let _ = reply.send(Ok(DeliveryStatus::Dropped));
            return;
        }
        self.writer.spill_answering(dest, envelope, reply);
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
        // Everything this router spilled for the device before now must be
        // committed before the new session reads the mailbox.
        let barrier = self.writer.barrier();
        let previous = self.remove(&msg.address);
        self.sessions.insert(
            msg.address,
            Entry {
                id: msg.id,
                session: msg.session,
                settled: Some(msg.settled),
            },
        );
        self.metrics.connected_devices.inc();
        let previous_settled = previous.and_then(|mut old| {
            log::info!(
                "{} connected elsewhere; replacing session {}",
                msg.address,
                old.id
            );
            old.session.close.do_send(Close::Replaced);
            old.settled.take()
        });
        Some(Box::pin(async move {
            let _ = barrier.await;
            if let Some(settled) = previous_settled {
                // An error means the old session is gone; it spilled when it stopped.
                let _ = tokio::time::timeout(REPLACE_GRACE, settled).await;
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
        match self.sessions.get(&msg.dest) {
            // If the session died with this message in its queue, the reply is
            // dropped unanswered and the messaging service spills the copy.
            Some(entry) if !self.draining => entry.session.deliver.do_send(Deliver {
                envelope: msg.envelope,
                ephemeral: msg.ephemeral,
                reply: msg.reply,
            }),
            _ => self.spill(msg.dest, msg.envelope, msg.ephemeral, msg.reply),
        }
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
        for (_, mut entry) in self.sessions.drain() {
            self.metrics.connected_devices.dec();
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
