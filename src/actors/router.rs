//! `Router`: the map from `(account, device)` to the live `DeviceSession`.
//!
//! It routes each copy to the device's session or, when the device is not
//! connected, spills it to the mailbox writer; it replaces an older session
//! of the same device; it drains every session at shutdown. It owns nothing
//! else and never touches the database or the pool.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix::{
    Actor, ActorFutureExt, Addr, Context, Handler, Message, ResponseActFuture, WrapFuture,
};
use tokio::sync::oneshot;

use super::mailbox::MailboxWriter;
use super::session::{Close, Deliver, DeviceSession, Drain as DrainSession};
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::envelope::Envelope;
use crate::metrics::Metrics;
use crate::store::mailbox::Outcome;
use crate::wire::DeliveryStatus;

/// Why a copy could be neither delivered nor stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// The device's mailbox is at its cap.
    MailboxFull,
    /// The database failed the write.
    Storage,
}

/// The answer for one routed copy.
pub type RouteReply = oneshot::Sender<Result<DeliveryStatus, RouteError>>;

/// What a committed (or refused) spill means for its sender.
pub fn spill_status(outcome: Result<Outcome, ()>) -> Result<DeliveryStatus, RouteError> {
    match outcome {
        Ok(Outcome::Stored) => Ok(DeliveryStatus::Queued),
        Ok(Outcome::Full) => Err(RouteError::MailboxFull),
        Ok(_) | Err(()) => Err(RouteError::Storage),
    }
}

/// A future the new session must wait for before it reads the mailbox.
pub type Settled = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Entry {
    id: u64,
    session: Addr<DeviceSession>,
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
        self.writer.spill_then(
            dest,
            envelope,
            Box::new(move |r| {
                let _ = reply.send(spill_status(r));
            }),
        );
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

/// From a new `DeviceSession`: register as the live connection of `address`.
/// `None` means the server is draining and the session must close.
#[derive(Message)]
#[rtype(result = "Option<Settled>")]
pub struct Connect {
    pub address: Address,
    pub id: u64,
    pub session: Addr<DeviceSession>,
    /// Fired by the session once it has spilled what it holds, whenever it ends.
    pub settled: oneshot::Receiver<()>,
}

/// From a `DeviceSession` that is stopping. Ignored unless `id` is the
/// registered one (a replaced session must not unregister its successor).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub address: Address,
    pub id: u64,
}

/// From the messaging service: deliver one copy live, or spill it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Route {
    pub dest: Address,
    pub envelope: Arc<Envelope>,
    /// `online: true`: live only, never stored.
    pub ephemeral: bool,
    pub reply: RouteReply,
}

/// From the accounts service: close the sessions of a deleted device
/// (`Some`) or of every device of a deleted account (`None`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseDevices {
    pub account: AccountId,
    pub device: Option<DeviceId>,
}

/// From the app at shutdown: refuse new sessions, have every session spill
/// and close with 1001; resolves when all have spilled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

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
            old.session.do_send(Close::Replaced);
            old.settled.take()
        });
        Some(Box::pin(async move {
            let _ = barrier.await;
            if let Some(settled) = previous_settled {
                // An error means the old session is gone; it spilled in stopping().
                let _ = settled.await;
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
            Some(entry) if !self.draining => entry.session.do_send(Deliver {
                envelope: msg.envelope,
                ephemeral: msg.ephemeral,
                reply: msg.reply,
            }),
            _ => self.spill(msg.dest, msg.envelope, msg.ephemeral, msg.reply),
        }
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
                entry.session.do_send(Close::Removed);
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
            entry.session.do_send(DrainSession);
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

/// How many devices are connected (for tests and the load tool).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ConnectedCount;

impl Handler<ConnectedCount> for Router {
    type Result = usize;

    fn handle(&mut self, _: ConnectedCount, _: &mut Context<Self>) -> usize {
        self.sessions.len()
    }
}
