//! Rendezvous across cluster nodes. A channel lives on the node that created
//! it (its home, recorded in the cluster with the channel's TTL); a side that
//! connects to another node joins it there through the bus. Two small
//! actors stand in for what is on the other node, so neither the hub nor the
//! WebSocket session knows the difference:
//! - [`RemoteSide`], on the home node: the hub's [`Side`] for a session on
//!   another node; it carries each [`ToSide`] event there, in order.
//! - [`RemoteHub`], on the session's node: the session's [`HubLink`]; it
//!   carries the session's frames and its leaving to the home node, in order.
//!
//! Order: each actor's packets go out one at a time, in order
//! ([`Outbound`]); a channel carries a handful of small frames, so this
//! costs nothing that matters.

use std::sync::Arc;

use actix::{Actor, ActorContext, Addr, Context, Handler};
use tokio::sync::mpsc;

use super::rendezvous::{EndVisit, HubLink, Leave, Relay, RendezvousHub, Side, ToSide};
use crate::cluster::packet::{Packet, RendezvousEvent};
use crate::cluster::{Bus, NodeId};

fn to_wire(event: ToSide) -> RendezvousEvent {
    match event {
        ToSide::Frame(frame) => RendezvousEvent::Frame(frame.to_vec()),
        ToSide::PeerJoined => RendezvousEvent::PeerJoined,
        ToSide::PeerLeft => RendezvousEvent::PeerLeft,
        ToSide::End(why) => RendezvousEvent::End(why),
    }
}

/// An event that came over the bus, for a session here.
pub fn from_wire(event: RendezvousEvent) -> ToSide {
    match event {
        RendezvousEvent::Frame(frame) => ToSide::Frame(frame.into()),
        RendezvousEvent::PeerJoined => ToSide::PeerJoined,
        RendezvousEvent::PeerLeft => ToSide::PeerLeft,
        RendezvousEvent::End(why) => ToSide::End(why),
    }
}

/// Packets to one node, sent one at a time in the order given, by a task of
/// their own: it outlives the actor that queued them (a session that sends
/// its last frame and leaves at once must still have both delivered), and
/// ends once the actor is gone and the queue is empty.
struct Outbound(mpsc::UnboundedSender<Packet>);

impl Outbound {
    fn new(bus: Arc<dyn Bus>, node: NodeId) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Packet>();
        actix::spawn(async move {
            while let Some(packet) = rx.recv().await {
                if let Err(e) = bus.send(vec![(node, packet)]).await {
                    log::warn!("{e}: a rendezvous packet was lost");
                }
            }
        });
        Outbound(tx)
    }

    fn send(&self, packet: Packet) {
        let _ = self.0.send(packet);
    }
}

/// On the channel's home node: the side that is a session on `node`.
pub struct RemoteSide {
    out: Outbound,
    /// The session's id as a visitor on its node.
    side: u64,
}

impl RemoteSide {
    /// The hub's `Side` for visiting side `side` of `node`. The actor lives
    /// as long as the hub holds that recipient.
    pub fn start(bus: Arc<dyn Bus>, node: NodeId, side: u64) -> Side {
        RemoteSide {
            out: Outbound::new(bus, node),
            side,
        }
        .start()
        .recipient()
    }
}

impl Actor for RemoteSide {
    type Context = Context<Self>;
}

impl Handler<ToSide> for RemoteSide {
    type Result = ();

    fn handle(&mut self, msg: ToSide, _: &mut Context<Self>) {
        self.out.send(Packet::RendezvousEvent {
            side: self.side,
            event: to_wire(msg),
        });
    }
}

/// On a session's node: the link to the hub of the node holding the channel.
pub struct RemoteHub {
    out: Outbound,
    /// This node's hub, which hands the session the events coming back.
    local: Addr<RendezvousHub>,
    visitor: u64,
}

impl RemoteHub {
    pub fn start(
        bus: Arc<dyn Bus>,
        home: NodeId,
        local: Addr<RendezvousHub>,
        visitor: u64,
    ) -> HubLink {
        let addr = RemoteHub {
            out: Outbound::new(bus, home),
            local,
            visitor,
        }
        .start();
        HubLink {
            relay: addr.clone().recipient(),
            leave: addr.recipient(),
        }
    }
}

impl Actor for RemoteHub {
    type Context = Context<Self>;
}

impl Handler<Relay> for RemoteHub {
    type Result = ();

    fn handle(&mut self, msg: Relay, _: &mut Context<Self>) {
        self.out.send(Packet::RendezvousFrame {
            side: msg.from,
            frame: msg.frame.to_vec(),
        });
    }
}

impl Handler<Leave> for RemoteHub {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        self.local.do_send(EndVisit { id: self.visitor });
        self.out.send(Packet::RendezvousLeave { side: msg.side });
        // Nothing more comes from this session.
        ctx.stop();
    }
}
