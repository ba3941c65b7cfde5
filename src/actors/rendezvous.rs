//! `RendezvousHub`: the table of rendezvous channels, and nothing else.
//!
//! A channel has two slots. The first two connections to join take them, in
//! order; a slot is never given to anyone else, even after its side has left,
//! so a stranger in the middle gets one PAKE guess per channel at most. Each
//! binary frame from one side goes to the other, in order; while the other
//! slot is empty, up to [`MAX_HELD_FRAMES`] frames wait for it here. The
//! channel ends when its TTL passes (connected sides are closed) or when its
//! last connected side leaves, and its entry is dropped then.
//!
//! The hub knows a side only as a [`Side`]: the `Recipient` of the
//! [`ToSide`] events it defines, as the router knows device sessions, and a
//! side knows its hub only as a [`HubLink`]. In a cluster a channel lives on
//! the node that created it; a side connected to another node is, here, a
//! `Recipient` that carries `ToSide` over the bus, and its session there
//! talks to this hub through a `HubLink` that carries `Relay`/`Leave` back
//! (`actors::rendezvous_remote`). That node's hub keeps such visiting
//! sessions in `visitors`, to hand them the events that come back.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, Recipient, SpawnHandle};
use bytes::Bytes;

use crate::domain::rendezvous::{ChannelId, MAX_HELD_FRAMES, MAX_OPEN_CHANNELS};
pub use crate::domain::rendezvous::{EndReason, JoinRefused, SideRef};
use crate::metrics::Metrics;

// ---- messages ----

/// From the hub to a side: what happened on its channel, in order.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum ToSide {
    /// A binary frame from the other side.
    Frame(Bytes),
    /// The other side is there (it joined, or was there when this one did).
    PeerJoined,
    /// The other side left.
    PeerLeft,
    /// The hub has let go of this side: close the socket.
    End(EndReason),
}

/// What the hub keeps of a side: where its events go.
pub type Side = Recipient<ToSide>;

/// Where a side sends its frames and its leaving: the hub of this node, or
/// (in a cluster) a link to the hub of the node that holds the channel.
#[derive(Clone)]
pub struct HubLink {
    pub relay: Recipient<Relay>,
    pub leave: Recipient<Leave>,
}

impl From<actix::Addr<RendezvousHub>> for HubLink {
    fn from(hub: actix::Addr<RendezvousHub>) -> Self {
        HubLink {
            relay: hub.clone().recipient(),
            leave: hub.recipient(),
        }
    }
}

/// From the cluster: a session here joined a channel held by another node
/// as side `id`; the events for it will arrive as [`VisitorEvent`]s.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Visit {
    pub id: u64,
    pub side: Side,
}

/// From the cluster: an event for visiting side `id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VisitorEvent {
    pub id: u64,
    pub event: ToSide,
}

/// From the cluster: visiting side `id` is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndVisit {
    pub id: u64,
}

/// From the service: a channel just created here that another node already
/// holds under the same id (the cluster refused it): drop it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Discard {
    pub channel: ChannelId,
}

/// From the service: open a channel alive for `ttl`. `None` while draining,
/// or while [`MAX_OPEN_CHANNELS`] are open.
#[derive(Message)]
#[rtype(result = "Option<ChannelId>")]
pub struct Create {
    pub ttl: Duration,
}

/// From a new side: take a slot on `channel`. Accepted, `side` starts
/// receiving events at once (the peer's presence, then held frames).
#[derive(Message)]
#[rtype(result = "Result<SideRef, JoinRefused>")]
pub struct Join {
    pub channel: ChannelId,
    pub side: Side,
}

/// From a side: one binary frame for the other side.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Relay {
    pub from: SideRef,
    pub frame: Bytes,
}

/// From a side whose connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub side: SideRef,
}

/// From the app at shutdown: close every side (1001) and refuse new channels.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DrainChannels;

/// How many channels are open (tests).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct OpenCount;

// ---- the actor ----

#[derive(Default)]
struct Slot {
    /// Taken by a side (connected or not): never given out again.
    taken: bool,
    side: Option<Side>,
    /// Frames from the other side waiting for this slot's side to join.
    held: VecDeque<Bytes>,
}

struct Channel {
    serial: u64,
    slots: [Slot; 2],
    expiry: SpawnHandle,
}

pub struct RendezvousHub {
    channels: HashMap<ChannelId, Channel>,
    /// Sessions here on channels held by other nodes, by visiting-side id.
    visitors: HashMap<u64, Side>,
    next_serial: u64,
    metrics: Metrics,
    draining: bool,
}

impl RendezvousHub {
    pub fn new(metrics: Metrics) -> Self {
        RendezvousHub {
            channels: HashMap::new(),
            visitors: HashMap::new(),
            next_serial: 0,
            metrics,
            draining: false,
        }
    }

    /// The channel `side` is on, if it is still that instance.
    fn channel_of(&mut self, side: SideRef) -> Option<&mut Channel> {
        self.channels
            .get_mut(&side.channel)
            .filter(|c| c.serial == side.serial)
    }

    /// Drops a channel, closing its connected sides with `why`.
    fn end(&mut self, id: ChannelId, why: Option<EndReason>, ctx: &mut Context<Self>) {
        let Some(channel) = self.channels.remove(&id) else {
            return;
        };
        ctx.cancel_future(channel.expiry);
        self.metrics.rendezvous_channels_open.dec();
        if let Some(why) = why {
            for side in channel.slots.into_iter().filter_map(|s| s.side) {
                side.do_send(ToSide::End(why));
            }
        }
    }

    /// `side` is gone: tell the other side, or end the channel if nobody is
    /// left on it (a slot is never reused, so nobody could talk to a lone
    /// late joiner).
    fn remove_side(&mut self, side: SideRef, ctx: &mut Context<Self>) {
        let Some(channel) = self.channel_of(side) else {
            return;
        };
        if channel.slots[side.slot].side.take().is_none() {
            return;
        }
        match &channel.slots[1 - side.slot].side {
            Some(other) => other.do_send(ToSide::PeerLeft),
            None => self.end(side.channel, None, ctx),
        }
    }
}

impl Actor for RendezvousHub {
    type Context = Context<Self>;
}

impl Handler<Create> for RendezvousHub {
    type Result = Option<ChannelId>;

    fn handle(&mut self, msg: Create, ctx: &mut Context<Self>) -> Option<ChannelId> {
        if self.draining || self.channels.len() >= MAX_OPEN_CHANNELS {
            return None;
        }
        // Retry on collision: with 10^8 ids the table is always mostly empty.
        let mut rng = rand::rngs::OsRng;
        let id = loop {
            let id = ChannelId::new_random(&mut rng);
            if !self.channels.contains_key(&id) {
                break id;
            }
        };
        self.next_serial += 1;
        let serial = self.next_serial;
        let expiry = ctx.run_later(msg.ttl, move |hub, ctx| {
            if hub.channels.get(&id).is_some_and(|c| c.serial == serial) {
                hub.end(id, Some(EndReason::Expired), ctx);
            }
        });
        self.channels.insert(
            id,
            Channel {
                serial,
                slots: Default::default(),
                expiry,
            },
        );
        self.metrics.rendezvous_channels_open.inc();
        Some(id)
    }
}

impl Handler<Join> for RendezvousHub {
    type Result = Result<SideRef, JoinRefused>;

    fn handle(&mut self, msg: Join, _: &mut Context<Self>) -> Self::Result {
        let Some(channel) = self.channels.get_mut(&msg.channel) else {
            return Err(JoinRefused::Unknown);
        };
        let Some(slot) = channel.slots.iter().position(|s| !s.taken) else {
            return Err(JoinRefused::Full);
        };
        let me = SideRef {
            channel: msg.channel,
            serial: channel.serial,
            slot,
        };
        if let Some(other) = &channel.slots[1 - slot].side {
            other.do_send(ToSide::PeerJoined);
            msg.side.do_send(ToSide::PeerJoined);
        }
        let mine = &mut channel.slots[slot];
        mine.taken = true;
        for frame in mine.held.drain(..) {
            self.metrics.rendezvous_frames_relayed.inc();
            msg.side.do_send(ToSide::Frame(frame));
        }
        mine.side = Some(msg.side);
        Ok(me)
    }
}

impl Handler<Relay> for RendezvousHub {
    type Result = ();

    fn handle(&mut self, msg: Relay, ctx: &mut Context<Self>) {
        let Some(channel) = self.channel_of(msg.from) else {
            return;
        };
        if channel.slots[msg.from.slot].side.is_none() {
            return;
        }
        let other = &mut channel.slots[1 - msg.from.slot];
        if let Some(side) = &other.side {
            side.do_send(ToSide::Frame(msg.frame));
            self.metrics.rendezvous_frames_relayed.inc();
        } else if other.taken {
            // The peer has come and gone: nobody will read it.
        } else if other.held.len() < MAX_HELD_FRAMES {
            other.held.push_back(msg.frame);
        } else {
            if let Some(sender) = &channel.slots[msg.from.slot].side {
                sender.do_send(ToSide::End(EndReason::TooManyHeld));
            }
            self.remove_side(msg.from, ctx);
        }
    }
}

impl Handler<Leave> for RendezvousHub {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        self.remove_side(msg.side, ctx);
    }
}

impl Handler<DrainChannels> for RendezvousHub {
    type Result = ();

    fn handle(&mut self, _: DrainChannels, ctx: &mut Context<Self>) {
        self.draining = true;
        for (_, side) in self.visitors.drain() {
            side.do_send(ToSide::End(EndReason::Draining));
        }
        let ids: Vec<ChannelId> = self.channels.keys().copied().collect();
        for id in ids {
            self.end(id, Some(EndReason::Draining), ctx);
        }
    }
}

impl Handler<Visit> for RendezvousHub {
    type Result = ();

    fn handle(&mut self, msg: Visit, _: &mut Context<Self>) {
        self.visitors.insert(msg.id, msg.side);
    }
}

impl Handler<VisitorEvent> for RendezvousHub {
    type Result = ();

    fn handle(&mut self, msg: VisitorEvent, _: &mut Context<Self>) {
        let ends = matches!(msg.event, ToSide::End(_));
        if let Some(side) = self.visitors.get(&msg.id) {
            side.do_send(msg.event);
        }
        if ends {
            self.visitors.remove(&msg.id);
        }
    }
}

impl Handler<EndVisit> for RendezvousHub {
    type Result = ();

    fn handle(&mut self, msg: EndVisit, _: &mut Context<Self>) {
        self.visitors.remove(&msg.id);
    }
}

impl Handler<Discard> for RendezvousHub {
    type Result = ();

    fn handle(&mut self, msg: Discard, ctx: &mut Context<Self>) {
        self.end(msg.channel, None, ctx);
    }
}

impl Handler<OpenCount> for RendezvousHub {
    type Result = usize;

    fn handle(&mut self, _: OpenCount, _: &mut Context<Self>) -> usize {
        self.channels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::probe::{Probe, Seen};

    /// A side that records what the hub sends it.
    fn probe() -> (Side, actix::Addr<Probe<ToSide>>) {
        let addr = Probe::default().start();
        (addr.clone().recipient(), addr)
    }

    fn frame(i: u8) -> Bytes {
        Bytes::from(vec![i; 3])
    }

    #[actix::test]
    async fn a_node_holds_a_bounded_number_of_channels() {
        let hub = RendezvousHub::new(Metrics::new()).start();
        let create = || Create {
            ttl: Duration::from_secs(60),
        };
        for _ in 0..MAX_OPEN_CHANNELS {
            assert!(hub.send(create()).await.unwrap().is_some());
        }
        assert_eq!(hub.send(create()).await.unwrap(), None);
        assert_eq!(hub.send(OpenCount).await.unwrap(), MAX_OPEN_CHANNELS);
    }

    #[actix::test]
    async fn held_frames_reach_the_second_side_in_order_then_live_ones() {
        let metrics = Metrics::new();
        let hub = RendezvousHub::new(metrics.clone()).start();
        let id = hub
            .send(Create {
                ttl: Duration::from_secs(60),
            })
            .await
            .unwrap()
            .unwrap();
        let (a, a_seen) = probe();
        let (b, b_seen) = probe();
        let a_ref = hub
            .send(Join {
                channel: id,
                side: a,
            })
            .await
            .unwrap()
            .unwrap();
        for i in 0..3 {
            hub.do_send(Relay {
                from: a_ref,
                frame: frame(i),
            });
        }
        let b_ref = hub
            .send(Join {
                channel: id,
                side: b,
            })
            .await
            .unwrap()
            .unwrap();
        hub.do_send(Relay {
            from: a_ref,
            frame: frame(3),
        });
        hub.do_send(Leave { side: b_ref });
        let (c, _) = probe();
        assert_eq!(
            hub.send(Join {
                channel: id,
                side: c
            })
            .await
            .unwrap(),
            Err(JoinRefused::Full)
        );
        assert_eq!(hub.send(OpenCount).await.unwrap(), 1);
        hub.do_send(Leave { side: a_ref });
        assert_eq!(hub.send(OpenCount).await.unwrap(), 0);
        let (d, _) = probe();
        assert_eq!(
            hub.send(Join {
                channel: id,
                side: d
            })
            .await
            .unwrap(),
            Err(JoinRefused::Unknown)
        );
        // The hub has handled everything above, so its events are queued.
        assert_eq!(
            b_seen.send(Seen::new()).await.unwrap(),
            [
                ToSide::PeerJoined,
                ToSide::Frame(frame(0)),
                ToSide::Frame(frame(1)),
                ToSide::Frame(frame(2)),
                ToSide::Frame(frame(3)),
            ]
        );
        assert_eq!(
            a_seen.send(Seen::new()).await.unwrap(),
            [ToSide::PeerJoined, ToSide::PeerLeft]
        );
        assert_eq!(metrics.rendezvous_frames_relayed.get(), 4);
        assert_eq!(metrics.rendezvous_channels_open.get(), 0);
    }
}
