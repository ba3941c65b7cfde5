//! The cluster bus: what a node needs from the others, behind one small
//! trait ([`Bus`]) so that the router, the relay and the services never
//! know it is Redis ([`redis::RedisBus`] is the one implementation).
//!
//! Three jobs, none durable (PostgreSQL stays the only durable store):
//! - **presence**: which node holds each connected device ([`Holder`]);
//! - **packets** between nodes ([`packet::Packet`]): one channel per node,
//!   and one every node hears (changes to accounts and devices);
//! - **shared rate limits**: the same [`crate::limits::SharedLimits`] GCRA
//!   state for every node.
//!
//! Packets are fire-and-forget (Redis pub/sub): a packet can be lost when a
//! node or its subscription dies. Every protocol built on them therefore
//! has a timeout and a fallback that keeps the delivery guarantee (see
//! `actors::relay`).

pub mod packet;
pub mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::address::Address;
use packet::Packet;

/// One member of the cluster, for as long as its process lives: a fresh
/// random id at each start, so a restarted node is a new node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeId(pub Uuid);

impl NodeId {
    pub fn random() -> Self {
        NodeId(Uuid::new_v4())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.simple().fmt(f)
    }
}

/// Where a device is connected: a node, and which of its connections
/// (connection ids are unique within a node's life).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub node: NodeId,
    pub conn: u64,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.conn)
    }
}

impl FromStr for Holder {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (node, conn) = s.split_once('/').ok_or(())?;
        Ok(Holder {
            node: NodeId(Uuid::try_parse(node).map_err(|_| ())?),
            conn: conn.parse().map_err(|_| ())?,
        })
    }
}

/// The bus could not be reached, or answered nonsense. Callers fall back to
/// what a node can do alone (spill, local limits) and count it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cluster bus: {0}")]
pub struct BusError(pub String);

pub type BusFuture<T> = Pin<Box<dyn Future<Output = Result<T, BusError>> + Send>>;

/// What the subscription reports to the node.
#[derive(Debug)]
pub enum Event {
    /// Subscribed (again): packets flow. Presence may have been lost
    /// meanwhile (Redis keeps nothing on disk), so the node re-announces.
    Up,
    /// The subscription broke: packets sent to this node are being lost
    /// until the next `Up`.
    Down,
    Packet(Packet),
}

/// A node's view of the cluster.
pub trait Bus: Send + Sync {
    /// This node.
    fn node(&self) -> NodeId;

    /// Whether this node's subscription is live (packets reach it).
    fn is_up(&self) -> bool;

    /// Records `holder` as the device's one live connection; gives back the
    /// one it replaces, if any (atomically: of two racing claims, the later
    /// one learns of the earlier).
    fn claim(&self, device: Address, holder: Holder) -> BusFuture<Option<Holder>>;

    /// Re-announces connections after an outage: records each device's
    /// holder unless another is recorded, and gives back that other one.
    fn claim_if_free(&self, claims: Vec<(Address, Holder)>) -> BusFuture<Vec<Option<Holder>>>;

    /// Forgets the device's presence if it is still `holder`.
    fn release(&self, device: Address, holder: Holder) -> BusFuture<()>;

    /// Where each device is connected, if anywhere.
    fn locate(&self, devices: Vec<Address>) -> BusFuture<Vec<Option<Holder>>>;

    /// Sends each packet to its node, in order; for each, whether a node
    /// was listening (`false`: that node is gone, or cut off).
    fn send(&self, packets: Vec<(NodeId, Packet)>) -> BusFuture<Vec<bool>>;

    /// Sends a packet to every node, this one included; how many heard it.
    fn broadcast(&self, packet: Packet) -> BusFuture<usize>;

    /// Records this node as the home of rendezvous channel `channel` for
    /// `ttl`; `false` if another node holds a channel of that id.
    fn register_channel(&self, channel: u32, ttl: Duration) -> BusFuture<bool>;

    /// The node holding rendezvous channel `channel`, if any.
    fn channel_home(&self, channel: u32) -> BusFuture<Option<NodeId>>;
}
