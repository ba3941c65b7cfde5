//! This node as a cluster member: the dispatcher of what other nodes say
//! ([`dispatch`]), and [`announce`], which tells every node about a change
//! to an account's devices before the change is answered.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use tokio::sync::{mpsc, oneshot};

use crate::actors::questions::{Announce, Answer, Applied, Questions};
use crate::actors::relay::{Confirmed, Relay};
use crate::actors::rendezvous::{
    Join as HubJoin, JoinRefused, Leave as HubLeave, Relay as HubRelay, VisitorEvent,
};
use crate::actors::rendezvous_remote::{from_wire, RemoteSide};
use crate::actors::router::{CloseDevices, EvictLocal, LocalSessions, RescanAt, Route, Via};
use crate::cluster::packet::{Confirmation, Packet, Removed};
use crate::cluster::{Bus, Event, Holder, NodeId};
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::service::state::State;

/// How long a change waits for every node to apply it. A node that has
/// not answered by then is dead or cut off from the bus, and a node cut
/// off from the bus caches nothing (`Directory::distrust`).
const ANNOUNCE_GRACE: Duration = Duration::from_secs(2);
/// Re-announcing after an outage: how often, how far apart.
/// Pauses between attempts grow from the first to the last.
const REANNOUNCE_PAUSE: Duration = Duration::from_millis(250);
const REANNOUNCE_PAUSE_MAX: Duration = Duration::from_secs(2);
/// How long an evicted connection may take to spill before the new one
/// (on another node) is told to go ahead anyway.
const EVICT_GRACE: Duration = Duration::from_secs(1);

/// The cluster handles a member node keeps in its state.
pub struct Cluster {
    pub bus: Arc<dyn Bus>,
    pub relay: Addr<Relay>,
    pub questions: Addr<Questions>,
}

/// Handles what the bus delivers to this node, for as long as it runs.
pub async fn dispatch(state: State, mut events: mpsc::Receiver<Event>) {
    let Some(cluster) = state.cluster.as_ref() else {
        return;
    };
    let (bus, relay, questions) = (
        cluster.bus.clone(),
        cluster.relay.clone(),
        cluster.questions.clone(),
    );
    while let Some(event) = events.recv().await {
        match event {
            Event::Up => {
                state.directory.trust();
                state.credentials.trust();
                actix::spawn(reannounce(state.clone()));
            }
            Event::Down => {
                state.directory.distrust();
                state.credentials.distrust();
            }
            Event::Packet(packet) => match packet {
                Packet::Forward {
                    from,
                    id,
                    dest,
                    envelope,
                    ephemeral,
                } => {
                    let (reply, outcome) = oneshot::channel();
                    state.router.do_send(Route {
                        dest: dest.into(),
                        envelope: Arc::new(envelope.into()),
                        ephemeral,
                        reply,
                        via: Via::Forwarded,
                    });
                    let bus = bus.clone();
                    actix::spawn(async move {
                        let what = match outcome.await {
                            Ok(Ok(status)) => status.into(),
                            Ok(Err(_)) => Confirmation::Failed,
                            Err(_) => Confirmation::NotHere,
                        };
                        reply_to(&*bus, from, Packet::Confirm { id, what }).await;
                    });
                }
                Packet::Confirm { id, what } => relay.do_send(Confirmed { id, what }),
                Packet::Evict {
                    from,
                    id,
                    device,
                    conn,
                } => {
                    let state = state.clone();
                    let bus = bus.clone();
                    actix::spawn(async move {
                        let evicted = state.router.send(EvictLocal {
                            address: device.into(),
                            conn,
                        });
                        if let Ok(Some(settled)) = evicted.await {
                            let _ = tokio::time::timeout(EVICT_GRACE, settled).await;
                            let _ = state.writer.barrier().await;
                        }
                        reply_to(&*bus, from, Packet::Evicted { id }).await;
                    });
                }
                answer @ Packet::Evicted { .. } => {
                    if let Packet::Evicted { id } = answer {
                        questions.do_send(Answer { id, packet: answer });
                    }
                }
                Packet::Changed {
                    from,
                    id,
                    account,
                    removed,
                } => {
                    // This node applied its own change before announcing it.
                    if from == bus.node() {
                        continue;
                    }
                    let state = state.clone();
                    let bus = bus.clone();
                    actix::spawn(async move {
                        apply_change(&state, AccountId(account), removed).await;
                        reply_to(&*bus, from, Packet::Applied { id }).await;
                    });
                }
                Packet::Applied { id } => questions.do_send(Applied { id }),
                Packet::Stored { device } => state.router.do_send(RescanAt {
                    address: Some(device.into()),
                }),
                Packet::RendezvousJoin {
                    from,
                    id,
                    channel,
                    side,
                } => {
                    let state = state.clone();
                    let bus = bus.clone();
                    actix::spawn(async move {
                        let remote = RemoteSide::start(bus.clone(), from, side);
                        let joined = state.rendezvous.send(HubJoin {
                            channel,
                            side: remote,
                        });
                        let outcome = joined.await.unwrap_or(Err(JoinRefused::Unknown));
                        reply_to(&*bus, from, Packet::RendezvousJoined { id, outcome }).await;
                    });
                }
                answer @ Packet::RendezvousJoined { .. } => {
                    if let Packet::RendezvousJoined { id, .. } = answer {
                        questions.do_send(Answer { id, packet: answer });
                    }
                }
                Packet::RendezvousEvent { side, event } => state.rendezvous.do_send(VisitorEvent {
                    id: side,
                    event: from_wire(event),
                }),
                Packet::RendezvousFrame { side, frame } => state.rendezvous.do_send(HubRelay {
                    from: side,
                    frame: frame.into(),
                }),
                Packet::RendezvousLeave { side } => state.rendezvous.do_send(HubLeave { side }),
            },
        }
    }
}

async fn reply_to(bus: &dyn Bus, node: NodeId, packet: Packet) {
    // A lost answer is covered by the asker's timeout and fallback.
    let _ = bus.send(vec![(node, packet)]).await;
}

/// After a bus outage (Redis may have restarted empty): record this node's
/// connections again. A device that connected elsewhere meanwhile keeps
/// that newer connection; this node's is closed with 4409. The others read
/// their mailboxes again.
async fn reannounce(state: State) {
    let Some(cluster) = state.cluster.as_ref() else {
        return;
    };
    let Ok(sessions) = state.router.send(LocalSessions).await else {
        return;
    };
    let node = cluster.bus.node();
    let claims: Vec<(Address, Holder)> = sessions
        .iter()
        .map(|&(address, conn)| (address, Holder { node, conn }))
        .collect();
    // The command connection may still be failing over to the new Redis:
    // try until it answers, for as long as the subscription stays up (until
    // then this node's devices get no copies from other nodes; if it goes
    // down again, the next `Up` starts over).
    let mut pause = REANNOUNCE_PAUSE;
    let claimed = loop {
        match cluster.bus.claim_if_free(claims.clone()).await {
            Err(e) if cluster.bus.is_up() => {
                log::debug!("{e}; re-announcing again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(REANNOUNCE_PAUSE_MAX);
            }
            result => break result,
        }
    };
    match claimed {
        Ok(others) => {
            for ((address, conn), other) in sessions.into_iter().zip(others) {
                if other.is_some() {
                    state.router.do_send(EvictLocal { address, conn });
                }
            }
            // Copies for these devices were stored meanwhile by nodes that
            // could not find them: push them now, not on the next connection.
            state.router.do_send(RescanAt { address: None });
        }
        Err(e) => {
            state.metrics.bus_errors.inc();
            log::warn!("{e}: cannot re-announce this node's connections yet");
        }
    }
}

/// What a change to `account`'s devices means for this node's caches and
/// connections.
async fn apply_change(state: &State, account: AccountId, removed: Option<Removed>) {
    state.directory.invalidate(account);
    let device = match removed {
        None => return,
        Some(Removed::Account) => {
            state.credentials.forget_account(account);
            state.writer.quota().forget(account, None);
            None
        }
        Some(Removed::Device(d)) => {
            let device = DeviceId(d);
            state
                .credentials
                .forget_device(Address::new(account, device));
            state.writer.quota().forget(account, Some(device));
            Some(device)
        }
    };
    let _ = state.router.send(CloseDevices { account, device }).await;
}

/// A change to `account`'s devices was committed: apply it here, then (in
/// a cluster) on every other node, and return once all have applied it
/// (bounded by [`ANNOUNCE_GRACE`]), so that from the moment the change is
/// answered, every node refuses a removed device and checks sends against
/// the new device set.
pub async fn announce(state: &State, account: AccountId, removed: Option<Removed>) {
    apply_change(state, account, removed).await;
    let Some(cluster) = state.cluster.as_ref() else {
        return;
    };
    let told = cluster
        .questions
        .send(Announce {
            account,
            removed,
            grace: ANNOUNCE_GRACE,
        })
        .await;
    if !matches!(told, Ok(Ok(()))) {
        // The change is committed; nodes that cannot hear the bus do not
        // cache, and the others' entries expire (device_cache_ttl_ms).
        log::warn!("a change to an account's devices could not be announced to the cluster");
    }
}
