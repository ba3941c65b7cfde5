//! `PUT /v1/messages/multi_recipient`: one Sealed Sender v2 body, a copy for
//! every device of every recipient account (SPEC "Sealed sender").
//!
//! The checks run for the whole send before anything is routed: the body
//! parses, the client's address is within its limit, every recipient
//! account exists (`404`), the access key is the XOR of the restricted
//! accounts' keys (`401`), and every account's device set is current
//! (`409`/`410` listing each account). Then each device gets its account's
//! ReceivedMessage as an envelope of type 6 with no sender, and the answer
//! waits for every copy like any send.

use std::net::IpAddr;
use std::sync::Arc;

use uuid::Uuid;

use crate::domain::access::{self, AccessKey, AccessPolicy};
use crate::domain::address::AccountId;
use crate::domain::device_set::{self, DeviceSetError};
use crate::domain::envelope::{Content, DeviceCopy, SharedPayload, MAX_CONTENT_BYTES};
use crate::domain::sealed_v2;
use crate::error::{AccountDevices, ApiError};
use crate::service::messaging::{self, Prepared, UNIDENTIFIED_SENDER_TYPE};
use crate::service::state::State;
use crate::store;
use crate::wire::MultiRecipientResponse;

/// Sends `body` (a libsignal SSv2 SentMessage) to every recipient it names.
pub async fn send(
    state: &State,
    key: AccessKey,
    client: IpAddr,
    timestamp: i64,
    online: bool,
    body: &[u8],
) -> Result<MultiRecipientResponse, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Unavailable);
    }
    if timestamp < 0 {
        return Err(ApiError::bad_request(
            "ts must be milliseconds since the epoch",
        ));
    }
    let message = sealed_v2::parse(body)
        .map_err(|e| ApiError::bad_request(format!("not a sealed-sender v2 message: {e}")))?;
    if message.recipients.is_empty() {
        return Err(ApiError::bad_request("the message names no recipient"));
    }
    state
        .limits
        .check(crate::limits::Limit::UnidentifiedSendPerIp, client)
        .await?;

    let accounts: Vec<AccountId> = message
        .recipients
        .iter()
        .map(|r| AccountId(r.account))
        .collect();
    let lookup = accounts.clone();
    let policies: Vec<Option<AccessPolicy>> = store::blocking(&state.pool, move |conn| {
        lookup
            .iter()
            .map(|a| store::accounts::access_policy(conn, *a))
            .collect::<Result<_, _>>()
            .map_err(ApiError::from)
    })
    .await?;
    let Some(policies) = policies.into_iter().collect::<Option<Vec<_>>>() else {
        return Err(ApiError::NotFound("no such account"));
    };
    if !access::allows_all(&policies, &key) {
        state.limits.auth_failure(client).await?;
        return Err(ApiError::Unauthorized);
    }

    // Held once in memory and stored once, however many copies.
    let shared = Arc::new(SharedPayload {
        id: Uuid::new_v4(),
        bytes: message.shared_part().to_vec(),
    });
    let mut mismatched = Vec::new();
    let mut stale = Vec::new();
    let mut copies = Vec::with_capacity(message.device_count());
    for (recipient, account) in message.recipients.iter().zip(&accounts) {
        let current = state
            .directory
            .devices(&state.pool, *account)
            .await?
            .ok_or(ApiError::NotFound("no such account"))?;
        let requested: Vec<(u32, i64)> = recipient
            .devices
            .iter()
            .map(|(device, registration)| (device.0, i64::from(*registration)))
            .collect();
        match device_set::check(&current, &requested, None) {
            Ok(()) => {}
            Err(DeviceSetError::Mismatched { missing, extra }) => {
                mismatched.push(AccountDevices::mismatched(*account, missing, extra));
                continue;
            }
            Err(DeviceSetError::Stale { stale: devices }) => {
                stale.push(AccountDevices::stale(*account, devices));
                continue;
            }
        }
        let content = Content::Shared {
            prefix: recipient.prefix().to_vec(),
            shared: shared.clone(),
        };
        if content.len() > MAX_CONTENT_BYTES {
            return Err(ApiError::TooLarge(format!(
                "the message exceeds {MAX_CONTENT_BYTES} bytes per recipient"
            )));
        }
        for (device, registration) in &recipient.devices {
            copies.push((
                *account,
                DeviceCopy {
                    device: *device,
                    registration_id: i64::from(*registration),
                    msg_type: UNIDENTIFIED_SENDER_TYPE,
                    content: content.clone(),
                },
            ));
        }
    }
    // Nothing is delivered from a refused send, to any account.
    if !mismatched.is_empty() {
        return Err(ApiError::MultiMismatched(mismatched));
    }
    if !stale.is_empty() {
        return Err(ApiError::MultiStale(stale));
    }
    let prepared = Prepared::reserve(state, None, online, timestamp, copies).await?;
    // Every copy is acknowledged or committed before the answer; the
    // per-device outcomes are not part of it (libsignal's client reads only
    // `uuids404`).
    let routed = messaging::route(state, prepared);
    actix_web::rt::spawn(async move { routed.taken().await.await })
        .await
        .unwrap_or(Err(ApiError::Internal))?;
    Ok(MultiRecipientResponse {
        uuids404: Vec::new(),
    })
}
