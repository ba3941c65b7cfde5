//! The messages the router exchanges with sessions and services. The router
//! defines what it sends to sessions (`Deliver`, `Close`, `AckLive`) and holds
//! them as `Recipient`s, as actix's chat server does, so it never imports the
//! session type (which lives in the transport layer, `crate::ws`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix::{Message, Recipient};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::RouteReply;
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

/// What the router keeps of a session: where to send each message.
#[derive(Clone)]
pub struct SessionHandle {
    pub deliver: Recipient<Deliver>,
    pub close: Recipient<Close>,
    pub ack: Recipient<AckLive>,
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
