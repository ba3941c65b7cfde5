//! The one send path (HTTP `PUT /v1/messages/{uuid}` and WebSocket `send`),
//! the mailbox fetch and the acknowledgement.
//!
//! A send is split in two so the WebSocket session can pipeline sends yet
//! route them in frame order: [`prepare`] (validation, rate limit, the Sesame
//! device-set check, the mailbox cap: nothing is routed, so a refused send
//! delivers nothing) and [`route`] (which hands every copy to the router
//! before it returns, then waits for each copy's outcome).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::actors::router::{spill_status, Route, RouteError};
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::device_set::{self, DeviceSetError};
use crate::domain::envelope::{new_guid, Envelope, MAX_CONTENT_BYTES, REGISTRATION_ID_RANGE};
use crate::error::ApiError;
use crate::state::State;
use crate::store;
use crate::store::mailbox::Outcome;
use crate::wire::{
    DeliveryStatus, EnvelopeJson, MessageList, SendRequest, SendResponse, SendResult,
};

/// Copies one send may carry; a send beyond it cannot match any account.
const MAX_COPIES: usize = 1_000;
/// Envelopes per `GET /v1/messages` page.
const FETCH_PAGE: i64 = 100;

/// One validated copy.
#[derive(Debug)]
struct Copy {
    device: DeviceId,
    registration_id: i64,
    msg_type: i32,
    content: Vec<u8>,
}

/// A send that passed every check and may be routed.
#[derive(Debug)]
pub struct Prepared {
    sender: Address,
    dest: AccountId,
    ephemeral: bool,
    timestamp: i64,
    copies: Vec<Copy>,
}

/// Shape, size and encoding of a send body (pure).
fn validate(body: SendRequest) -> Result<(bool, i64, Vec<Copy>), ApiError> {
    if body.timestamp < 0 {
        return Err(ApiError::bad_request(
            "timestamp must be milliseconds since the epoch",
        ));
    }
    if body.messages.len() > MAX_COPIES {
        return Err(ApiError::bad_request("too many copies in one send"));
    }
    let mut seen = BTreeSet::new();
    let mut copies = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.into_iter().enumerate() {
        if m.destination_device_id == 0 {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].destinationDeviceId must be positive"
            )));
        }
        if !seen.insert(m.destination_device_id) {
            return Err(ApiError::bad_request(format!(
                "messages[{i}]: more than one copy for device {}",
                m.destination_device_id
            )));
        }
        if !REGISTRATION_ID_RANGE.contains(&m.destination_registration_id) {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].destinationRegistrationId must be in 1..=16380"
            )));
        }
        let msg_type = i32::try_from(m.msg_type)
            .map_err(|_| ApiError::bad_request(format!("messages[{i}].type is out of range")))?;
        // Reject by encoded length first so a huge string is never decoded.
        if m.content.len() > MAX_CONTENT_BYTES.div_ceil(3) * 4 {
            return Err(ApiError::TooLarge(format!(
                "messages[{i}].content exceeds 256 KiB"
            )));
        }
        let content = STANDARD.decode(m.content.as_bytes()).map_err(|_| {
            ApiError::bad_request(format!("messages[{i}].content is not standard base64"))
        })?;
        if content.is_empty() {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].content is empty"
            )));
        }
        if content.len() > MAX_CONTENT_BYTES {
            return Err(ApiError::TooLarge(format!(
                "messages[{i}].content exceeds 256 KiB"
            )));
        }
        copies.push(Copy {
            device: DeviceId(m.destination_device_id),
            registration_id: m.destination_registration_id,
            msg_type,
            content,
        });
    }
    Ok((body.online.unwrap_or(false), body.timestamp, copies))
}

/// The body checks alone (for fuzzing and tests): the number of copies, or
/// the error a send with this body gets before any lookup.
pub fn validate_body(body: SendRequest) -> Result<usize, ApiError> {
    validate(body).map(|(_, _, copies)| copies.len())
}

/// Everything before routing: validation, rate limit and the device-set
/// check. Nothing is delivered from a send refused here.
pub async fn prepare(
    state: &State,
    sender: Address,
    destination: &str,
    body: SendRequest,
) -> Result<Prepared, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Unavailable);
    }
    let dest: AccountId = destination
        .parse()
        .map_err(|_| ApiError::bad_request("destination is not an account UUID"))?;
    let (ephemeral, timestamp, copies) = validate(body)?;
    state.limits.send(sender.account)?;

    // The mailbox cap is enforced where copies are committed (the mailbox
    // writer), so the only lookup here is the (cached) device set.
    let current = state
        .directory
        .devices(&state.pool, dest)
        .await?
        .ok_or(ApiError::NotFound("no such account"))?;
    let requested: Vec<(u32, i64)> = copies
        .iter()
        .map(|c| (c.device.0, c.registration_id))
        .collect();
    let exclude = (dest == sender.account).then_some(sender.device.0);
    device_set::check(&current, &requested, exclude).map_err(|e| match e {
        DeviceSetError::Mismatched { missing, extra } => {
            ApiError::MismatchedDevices { missing, extra }
        }
        DeviceSetError::Stale { stale } => ApiError::StaleDevices { stale },
    })?;
    Ok(Prepared {
        sender,
        dest,
        ephemeral,
        timestamp,
        copies,
    })
}

/// Hands every copy to the router now (before returning) and gives back the
/// future of the answer: it resolves once each copy is acknowledged live or
/// committed to its mailbox (or, if ephemeral, pushed or dropped).
pub fn route(
    state: &State,
    prepared: Prepared,
) -> impl Future<Output = Result<SendResponse, ApiError>> + use<> {
    let server_timestamp = store::now_ms();
    let Prepared {
        sender,
        dest,
        ephemeral,
        timestamp,
        copies,
    } = prepared;
    let mut waits = Vec::with_capacity(copies.len());
    for copy in copies {
        let envelope = Arc::new(Envelope {
            guid: new_guid(),
            source: sender,
            msg_type: copy.msg_type,
            timestamp,
            server_timestamp,
            content: copy.content,
        });
        let (reply, outcome) = oneshot::channel();
        let to = Address::new(dest, copy.device);
        state.router.do_send(Route {
            dest: to,
            envelope: envelope.clone(),
            ephemeral,
            reply,
        });
        waits.push((to, envelope, outcome));
    }
    if !ephemeral {
        state.metrics.messages_accepted.inc_by(waits.len() as u64);
    }
    let writer = state.writer.clone();
    async move {
        let mut results = Vec::with_capacity(waits.len());
        for (to, envelope, outcome) in waits {
            let status = match outcome.await {
                Ok(Ok(status)) => status,
                Ok(Err(RouteError::MailboxFull)) => return Err(ApiError::MailboxFull),
                Ok(Err(RouteError::Storage)) => return Err(ApiError::Internal),
                // The session ended with the copy still in its queue: store
                // it here, so an answered send is never lost.
                Err(_) if ephemeral => DeliveryStatus::Dropped,
                Err(_) => {
                    match spill_status(writer.spill(to, envelope.clone()).await.unwrap_or(Err(())))
                    {
                        Ok(status) => status,
                        Err(RouteError::MailboxFull) => return Err(ApiError::MailboxFull),
                        Err(RouteError::Storage) => return Err(ApiError::Internal),
                    }
                }
            };
            results.push(SendResult {
                device_id: to.device.0,
                guid: envelope.guid.hyphenated().to_string(),
                status,
            });
        }
        Ok(SendResponse { results })
    }
}

/// `prepare` then `route`, for the HTTP path.
pub async fn send(
    state: &State,
    sender: Address,
    destination: &str,
    body: SendRequest,
) -> Result<SendResponse, ApiError> {
    let prepared = prepare(state, sender, destination, body).await?;
    route(state, prepared).await
}

/// The oldest page of `device`'s mailbox.
pub async fn fetch(state: &State, device: Address) -> Result<MessageList, ApiError> {
    let mut page = store::blocking(&state.pool, move |conn| {
        store::mailbox::load_page(conn, device, None, FETCH_PAGE + 1).map_err(ApiError::from)
    })
    .await?;
    let more = page.len() as i64 > FETCH_PAGE;
    page.truncate(FETCH_PAGE as usize);
    Ok(MessageList {
        messages: page.iter().map(EnvelopeJson::from).collect(),
        more,
    })
}

/// Deletes an acknowledged copy from `device`'s mailbox; 404 when it is not
/// there (another device's, or already gone).
pub async fn acknowledge(state: &State, device: Address, guid: &str) -> Result<(), ApiError> {
    let guid = Uuid::parse_str(guid).map_err(|_| ApiError::NotFound("no such message"))?;
    match state.writer.delete(device, guid).await {
        Ok(Ok(Outcome::Deleted)) => Ok(()),
        Ok(Ok(_)) => Err(ApiError::NotFound("no such message")),
        _ => Err(ApiError::Internal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::OutgoingMessage;

    fn msg(device: u32, content: &str) -> OutgoingMessage {
        OutgoingMessage {
            destination_device_id: device,
            destination_registration_id: 7,
            msg_type: 1,
            content: content.into(),
        }
    }

    fn body(messages: Vec<OutgoingMessage>) -> SendRequest {
        SendRequest {
            timestamp: 1,
            online: None,
            messages,
        }
    }

    #[test]
    fn accepts_a_well_formed_send() {
        let (eph, ts, copies) = validate(body(vec![msg(1, "aGk="), msg(2, "aGk=")])).unwrap();
        assert!(!eph);
        assert_eq!(ts, 1);
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].content, b"hi");
    }

    #[test]
    fn refuses_malformed_copies() {
        let cases = [
            body(vec![msg(1, "not base64!")]),
            body(vec![msg(1, "")]),
            body(vec![msg(0, "aGk=")]),
            body(vec![msg(1, "aGk="), msg(1, "aGk=")]),
        ];
        for case in cases {
            assert!(matches!(validate(case), Err(ApiError::BadRequest(_))));
        }
        let mut m = msg(1, "aGk=");
        m.destination_registration_id = 16381;
        assert!(matches!(
            validate(body(vec![m])),
            Err(ApiError::BadRequest(_))
        ));
        let mut m = msg(1, "aGk=");
        m.msg_type = i64::from(i32::MAX) + 1;
        assert!(matches!(
            validate(body(vec![m])),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn refuses_oversize_content_with_413() {
        let big = STANDARD.encode(vec![0u8; MAX_CONTENT_BYTES + 1]);
        assert!(matches!(
            validate(body(vec![msg(1, &big)])),
            Err(ApiError::TooLarge(_))
        ));
        let max = STANDARD.encode(vec![0u8; MAX_CONTENT_BYTES]);
        assert!(validate(body(vec![msg(1, &max)])).is_ok());
    }
}
