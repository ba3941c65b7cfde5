//! Rendezvous: channels for two sides to run a PAKE through courier
//! (SPEC "Rendezvous"). The channels themselves live in the
//! [`RendezvousHub`](crate::actors::rendezvous::RendezvousHub); this is the
//! part the HTTP handler and the WebSocket transport share: rate limits,
//! lifetimes, the SPEC's answers and, in a cluster, where a channel lives
//! (the node that created it; a side on another node joins it through the
//! bus, see `actors::rendezvous_remote`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::actors::questions::Ask;
use crate::actors::rendezvous::{
    Create, Discard, HubLink, Join, JoinRefused, Side, SideRef, Visit,
};
use crate::actors::rendezvous_remote::RemoteHub;
use crate::cluster::packet::Packet;
use crate::domain::address::Address;
use crate::domain::rendezvous::ChannelId;
use crate::error::ApiError;
use crate::service::state::State;
use crate::store;
use crate::wire::RendezvousChannel;

const UNKNOWN: ApiError = ApiError::NotFound("no such rendezvous channel (or its time is up)");

/// Ids drawn before giving up on finding one no other node holds.
const CREATE_ATTEMPTS: usize = 8;
/// How long a join waits for the channel's home node to answer.
const REMOTE_JOIN_GRACE: Duration = Duration::from_secs(2);

/// Ids of this node's sessions on channels held by other nodes.
static NEXT_VISITOR: AtomicU64 = AtomicU64::new(1);

/// `POST /v1/rendezvous`: a new channel, alive for `rendezvous_ttl_secs`.
pub async fn create(state: &State, device: Address) -> Result<RendezvousChannel, ApiError> {
    state.limits.rendezvous_create(device.account).await?;
    let ttl = state.config.rendezvous_ttl();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_at = store::now_ms().saturating_add(ttl_ms);
    for _ in 0..CREATE_ATTEMPTS {
        let channel = state
            .rendezvous
            .send(Create { ttl })
            .await?
            .ok_or(ApiError::Unavailable)?;
        if registered(state, channel, ttl).await {
            return Ok(RendezvousChannel {
                channel: channel.to_string(),
                expires_at,
            });
        }
        state.rendezvous.do_send(Discard { channel });
    }
    Err(ApiError::Unavailable)
}

/// In a cluster, records this node as the channel's home; `false` if
/// another node already holds that id. Without the bus the channel works
/// for sides on this node only.
async fn registered(state: &State, channel: ChannelId, ttl: Duration) -> bool {
    let Some(cluster) = state.cluster.as_ref() else {
        return true;
    };
    match cluster.bus.register_channel(channel.number(), ttl).await {
        Ok(free) => free,
        Err(e) => {
            state.metrics.bus_errors.inc();
            log::warn!("{e}: a rendezvous channel is open on this node only");
            true
        }
    }
}

/// `GET /v1/rendezvous/{channel}`, before the upgrade: takes a slot on the
/// channel for `side`, on this node or on the node holding the channel.
/// Every attempt counts against the join limit, found or not, so ids cannot
/// be tried in bulk.
pub async fn join(
    state: &State,
    device: Address,
    channel: &str,
    side: Side,
) -> Result<(SideRef, HubLink), ApiError> {
    state.limits.rendezvous_join(device.account).await?;
    let channel: ChannelId = channel.parse().map_err(|()| UNKNOWN)?;
    let joined = state
        .rendezvous
        .send(Join {
            channel,
            side: side.clone(),
        })
        .await?;
    match joined {
        Ok(me) => Ok((me, state.rendezvous.clone().into())),
        Err(JoinRefused::Unknown) => join_elsewhere(state, channel, side).await,
        Err(JoinRefused::Full) => Err(ApiError::ChannelFull),
    }
}

/// Joins a channel another node of the cluster holds.
async fn join_elsewhere(
    state: &State,
    channel: ChannelId,
    side: Side,
) -> Result<(SideRef, HubLink), ApiError> {
    let Some(cluster) = state.cluster.as_ref() else {
        return Err(UNKNOWN);
    };
    let home = match cluster.bus.channel_home(channel.number()).await {
        Ok(Some(home)) if home != cluster.bus.node() => home,
        Ok(_) => return Err(UNKNOWN),
        Err(e) => {
            state.metrics.bus_errors.inc();
            log::warn!("{e}: cannot look for a rendezvous channel on other nodes");
            return Err(ApiError::Unavailable);
        }
    };
    let visitor = NEXT_VISITOR.fetch_add(1, Ordering::Relaxed);
    // Registered before asking, so no event from the home node can come
    // before the session is there to take it.
    state.rendezvous.do_send(Visit { id: visitor, side });
    let from = cluster.bus.node();
    let answer = cluster
        .questions
        .send(Ask {
            node: home,
            question: Box::new(move |id| Packet::RendezvousJoin {
                from,
                id,
                channel,
                side: visitor,
            }),
            grace: REMOTE_JOIN_GRACE,
        })
        .await?;
    let outcome = match answer {
        Some(Packet::RendezvousJoined { outcome, .. }) => outcome,
        _ => Err(JoinRefused::Unknown),
    };
    match outcome {
        Ok(me) => {
            let link =
                RemoteHub::start(cluster.bus.clone(), home, state.rendezvous.clone(), visitor);
            Ok((me, link))
        }
        Err(refused) => {
            state
                .rendezvous
                .do_send(crate::actors::rendezvous::EndVisit { id: visitor });
            Err(match refused {
                JoinRefused::Unknown => UNKNOWN,
                JoinRefused::Full => ApiError::ChannelFull,
            })
        }
    }
}
