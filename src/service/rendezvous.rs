//! Rendezvous: channels for two sides to run a PAKE through courier
//! (SPEC "Rendezvous"). The channels themselves live in the
//! [`RendezvousHub`](crate::actors::rendezvous::RendezvousHub); this is the
//! part the HTTP handler and the WebSocket transport share: rate limits,
//! lifetimes and the SPEC's answers.

use crate::actors::rendezvous::{Create, Join, JoinRefused, Side, SideRef};
use crate::domain::address::Address;
use crate::domain::rendezvous::ChannelId;
use crate::error::ApiError;
use crate::service::state::State;
use crate::store;
use crate::wire::RendezvousChannel;

const UNKNOWN: ApiError = ApiError::NotFound("no such rendezvous channel (or its time is up)");

/// `POST /v1/rendezvous`: a new channel, alive for `rendezvous_ttl_secs`.
pub async fn create(state: &State, device: Address) -> Result<RendezvousChannel, ApiError> {
    state.limits.rendezvous_create(device.account).await?;
    let ttl = state.config.rendezvous_ttl();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_at = store::now_ms().saturating_add(ttl_ms);
    let channel = state
        .rendezvous
        .send(Create { ttl })
        .await?
        .ok_or(ApiError::Unavailable)?;
    Ok(RendezvousChannel {
        channel: channel.to_string(),
        expires_at,
    })
}

/// `GET /v1/rendezvous/{channel}`, before the upgrade: takes a slot on the
/// channel for `side`. Every attempt counts against the join limit, found
/// or not, so ids cannot be tried in bulk.
pub async fn join(
    state: &State,
    device: Address,
    channel: &str,
    side: Side,
) -> Result<SideRef, ApiError> {
    state.limits.rendezvous_join(device.account).await?;
    let channel: ChannelId = channel.parse().map_err(|()| UNKNOWN)?;
    match state.rendezvous.send(Join { channel, side }).await? {
        Ok(side) => Ok(side),
        Err(JoinRefused::Unknown) => Err(UNKNOWN),
        Err(JoinRefused::Full) => Err(ApiError::ChannelFull),
    }
}
