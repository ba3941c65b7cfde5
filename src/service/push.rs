//! Push subscriptions (SPEC "Push"): what `PUT` and `DELETE /v1/push` do.
//! Pushing itself is the [`Pusher`](crate::actors::push::Pusher)'s.

use crate::actors::push::{check_host, Reset};
use crate::domain::address::Address;
use crate::domain::push::{check_subscription, PushError};
use crate::error::ApiError;
use crate::service::state::State;
use crate::store::{self, push::StoredSubscription};
use crate::wire::PushSubscription;

impl From<PushError> for ApiError {
    fn from(e: PushError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

/// Stores `device`'s subscription, replacing its earlier one, once the
/// endpoint and keys are checked and the endpoint's host resolves to
/// public addresses only (it is checked again at every push).
pub async fn subscribe(
    state: &State,
    device: Address,
    body: PushSubscription,
) -> Result<(), ApiError> {
    state.limits.push_subscribe(device.account).await?;
    let insecure = state.config.push_allow_insecure;
    let sub = check_subscription(&body.endpoint, &body.keys.p256dh, &body.keys.auth, insecure)?;
    check_host(&sub.endpoint, insecure).await?;
    let stored = StoredSubscription {
        endpoint: sub.endpoint.to_string(),
        p256dh: sub.p256dh,
        auth: sub.auth,
    };
    let now = store::now_ms();
    let exists = store::blocking(&state.pool, move |conn| {
        store::push::put_subscription(conn, device, &stored, now)
    })
    .await?;
    if !exists {
        return Err(ApiError::Unauthorized);
    }
    // A new subscription is pushed at the next missed copy.
    state.pusher.do_send(Reset { device });
    Ok(())
}

/// Deletes `device`'s subscription, if it has one.
pub async fn unsubscribe(state: &State, device: Address) -> Result<(), ApiError> {
    store::blocking(&state.pool, move |conn| {
        store::push::delete_subscription(conn, device, None)
    })
    .await?;
    Ok(())
}
