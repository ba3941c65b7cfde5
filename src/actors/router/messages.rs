//! The messages the router exchanges with sessions and services. The router
//! defines what it sends to sessions (`Deliver`, `Close`, `AckLive`) and holds
//! them as `Recipient`s, as actix's chat server does, so it never imports the
//! session type (which lives in the transport layer, `crate::ws`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix::{Addr, Message, Recipient};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::RouteReply;
use crate::actors::questions::Questions;
use crate::actors::relay::Relay;
use crate::cluster::Bus;
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::envelope::Envelope;

/// From the router to a session: push one copy to the device.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub envelope: Arc<Envelope>,
    /// `online: true`: pushed if possible, never stored.
    pub ephemeral: bool,
    pub reply: RouteReply,
}

/// From the router to a session: close the connection.
#[derive(Message, Clone, Copy, Debug, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum Close {
    /// A newer connection of the same device took over (4409).
    Replaced,
    /// The device or its account was deleted (4401).
    Removed,
    /// The server is shutting down: spill everything, close with 1001.
    Draining,
}

/// From the router to a session: the device acknowledged `guid` by HTTP.
/// `true` when the session held it as a live copy (its sender is answered
/// `delivered` and nothing is stored); `false` means look in the mailbox.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct AckLive {
    pub guid: Uuid,
}

/// From the router to a live session: copies for its device were stored
/// while it was connected (in a cluster: by a node that could not reach
/// it), so read the mailbox again and push what it does not hold yet.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Rescan;

/// What the router keeps of a session: where to send each message.
#[derive(Clone)]
pub struct SessionHandle {
    pub deliver: Recipient<Deliver>,
    pub close: Recipient<Close>,
    pub ack: Recipient<AckLive>,
    pub rescan: Recipient<Rescan>,
}

/// From the cluster: have `address`'s session here rescan its mailbox
/// (`None`: every session here, after a bus outage).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RescanAt {
    pub address: Option<Address>,
}

/// A future the new session must wait for before it reads the mailbox.
pub type Settled = Pin<Box<dyn Future<Output = ()> + Send>>;

/// From a new session: register as the live connection of `address`.
/// `None` means the server is draining and the session must close.
#[derive(Message)]
#[rtype(result = "Option<Settled>")]
pub struct Connect {
    pub address: Address,
    /// Unique per connection, so a replaced session cannot unregister its successor.
    pub id: u64,
    pub session: SessionHandle,
    /// Fired by the session once it has spilled what it holds, whenever it ends.
    pub settled: oneshot::Receiver<()>,
}

/// From a session that is stopping. Ignored unless `id` is the registered one.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub address: Address,
    pub id: u64,
}

/// Where a routed copy comes from, which decides what happens when the
/// device is not connected to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Accepted by this node: in a cluster, find the device's node (the
    /// relay); alone, or connected nowhere, store it.
    Accepted,
    /// Forwarded by another node, which keeps it until it hears back: if
    /// the device is not here, the reply is dropped unanswered (`NotHere`).
    Forwarded,
    /// Came back `NotHere` once: one more search, then the mailbox.
    Rerouted,
}

/// From the messaging service (or the cluster): deliver one copy live, or
/// spill it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Route {
    pub dest: Address,
    pub envelope: Arc<Envelope>,
    /// `online: true`: live only, never stored.
    pub ephemeral: bool,
    pub reply: RouteReply,
    pub via: Via,
}

/// From the app, once, right after start: this node is a cluster member.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub bus: Arc<dyn Bus>,
    pub relay: Addr<Relay>,
    pub questions: Addr<Questions>,
}

/// From the cluster: a newer connection of `address` on another node took
/// over; close connection `conn` here (4409) if it is still the live one.
/// Resolves with its `Settled` (spilled) future, or `None` if it was not here.
#[derive(Message)]
#[rtype(result = "Option<Settled>")]
pub struct EvictLocal {
    pub address: Address,
    pub conn: u64,
}

/// Every live connection here, as `(address, connection id)`: what this
/// node re-announces to the cluster after a bus outage.
#[derive(Message)]
#[rtype(result = "Vec<(Address, u64)>")]
pub struct LocalSessions;

/// From the messaging service (HTTP `DELETE /v1/messages/{guid}`): ack a
/// copy held by `dest`'s live session, if it holds it.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct AckAt {
    pub dest: Address,
    pub guid: Uuid,
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

/// How many devices are connected (for tests and the load tool).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ConnectedCount;
