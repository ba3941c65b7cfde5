//! The one send path (HTTP `PUT /v1/messages/{uuid}` and WebSocket `send`),
//! the mailbox fetch and the acknowledgement.
//!
//! A send is split in two so the WebSocket session can pipeline sends yet
//! route them in frame order: [`prepare`] (validation, rate limit, the Sesame
//! device-set check, and a reserved mailbox slot per copy: nothing is
//! routed, so a refused send delivers nothing) and [`route`] (which hands
//! every copy to the router before it returns, then waits for every copy's
//! outcome, so no routed copy is ever left unaccounted for).

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::actors::mailbox::quota::{Reserve, Reserved};
use crate::actors::mailbox::spill_status;
use crate::actors::push::Wake;
use crate::actors::router::{AckAt, Deliver, Route, Router, Via};
use crate::domain::access::{self, AccessKey};
use crate::domain::address::{AccountId, Address};
use crate::domain::device_set::{self, DeviceSetError};
use crate::domain::envelope::{
    new_guid, validate_send, DeviceCopy, Envelope, SendRefusal, ValidSend,
};
use crate::error::ApiError;
use crate::service::state::State;
use crate::store;
use crate::store::mailbox::Outcome;
use crate::wire::{
    DeliveryStatus, EnvelopeJson, MessageList, SendRequest, SendResponse, SendResult,
};

/// Envelopes per `GET /v1/messages` page.
const FETCH_PAGE: i64 = 100;
/// Pages of rows one `GET /v1/messages` reads at most, past unreadable rows.
const FETCH_SCAN_PAGES: usize = 10;

impl From<SendRefusal> for ApiError {
    fn from(r: SendRefusal) -> Self {
        match r {
            SendRefusal::Malformed(m) => ApiError::BadRequest(m),
            SendRefusal::TooLarge(m) => ApiError::TooLarge(m),
        }
    }
}

impl From<DeviceSetError> for ApiError {
    fn from(e: DeviceSetError) -> Self {
        match e {
            DeviceSetError::Mismatched { missing, extra } => {
                ApiError::MismatchedDevices { missing, extra }
            }
            DeviceSetError::Stale { stale } => ApiError::StaleDevices { stale },
        }
    }
}

/// Who a send comes from, as far as the server may know.
#[derive(Debug, Clone, Copy)]
pub enum SendAs {
    /// An authenticated device.
    Device(Address),
    /// Sealed sender: nobody the server knows. The destination account's
    /// unidentified-access key opens the send; it is counted against the
    /// client's address and the destination instead of a sender.
    Unidentified { key: AccessKey, client: IpAddr },
}

/// The Signal envelope type of a sealed-sender copy (`UNIDENTIFIED_SENDER`):
/// the only type an unidentified send may carry.
pub const UNIDENTIFIED_SENDER_TYPE: i32 = 6;

/// A send that passed every check and may be routed.
#[derive(Debug)]
pub struct Prepared {
    /// `None` for a sealed-sender send.
    sender: Option<Address>,
    ephemeral: bool,
    timestamp: i64,
    /// Each copy with its destination account (one account, except for a
    /// multi-recipient send).
    copies: Vec<(AccountId, DeviceCopy)>,
    /// One mailbox slot per copy (none for an ephemeral send).
    slots: Vec<Reserved>,
}

/// The body checks alone (for fuzzing and tests): the number of copies, or
/// the error a send with this body gets before any lookup.
pub fn validate_body(body: SendRequest) -> Result<usize, ApiError> {
    Ok(validate_send(body.into())?.copies.len())
}

/// Everything before routing: validation, rate limit, the sender still
/// exists, the device-set check, and room in every destination mailbox.
/// Nothing is delivered from a send refused here.
pub async fn prepare(
    state: &State,
    from: SendAs,
    destination: &str,
    body: SendRequest,
) -> Result<Prepared, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Unavailable);
    }
    let dest: AccountId = destination
        .parse()
        .map_err(|_| ApiError::bad_request("destination is not an account UUID"))?;
    let send = validate_send(body.into())?;
    let sender = match from {
        SendAs::Device(sender) => sender,
        SendAs::Unidentified { key, client } => {
            return prepare_unidentified(state, key, client, dest, send).await;
        }
    };
    state.limits.send(sender.account).await?;

    // A device deleted since it authenticated (or since its socket opened)
    // sends nothing more.
    let own = state.directory.devices(&state.pool, sender.account).await?;
    let own = match own {
        Some(set) if set.contains_key(&sender.device.0) => set,
        _ => return Err(ApiError::Unauthorized),
    };
    // A send to one's own account needs no second lookup.
    let current = if dest == sender.account {
        own
    } else {
        state
            .directory
            .devices(&state.pool, dest)
            .await?
            .ok_or(ApiError::NotFound("no such account"))?
    };
    let requested: Vec<(u32, i64)> = send
        .copies
        .iter()
        .map(|c| (c.device.0, c.registration_id))
        .collect();
    let exclude = (dest == sender.account).then_some(sender.device.0);
    device_set::check(&current, &requested, exclude)?;
    reserved(state, Some(sender), dest, send).await
}

/// [`prepare`] for a sealed-sender send: every copy of type 6, the rate
/// limits of the client's address and of the destination, then the
/// destination's access key. An unknown account and a wrong key are the same
/// `401`, so the send tells nothing of who has an account.
async fn prepare_unidentified(
    state: &State,
    key: AccessKey,
    client: IpAddr,
    dest: AccountId,
    send: ValidSend,
) -> Result<Prepared, ApiError> {
    if send
        .copies
        .iter()
        .any(|c| c.msg_type != UNIDENTIFIED_SENDER_TYPE)
    {
        return Err(ApiError::bad_request(
            "an unidentified send carries only sealed-sender copies (type 6)",
        ));
    }
    state.limits.unidentified_send(client, dest).await?;
    let policy = store::blocking(&state.pool, move |conn| {
        store::accounts::access_policy(conn, dest).map_err(ApiError::from)
    })
    .await?;
    if !policy.is_some_and(|policy| access::allows(&policy, &key)) {
        state.limits.auth_failure(client).await?;
        return Err(ApiError::Unauthorized);
    }
    let current = state
        .directory
        .devices(&state.pool, dest)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let requested: Vec<(u32, i64)> = send
        .copies
        .iter()
        .map(|c| (c.device.0, c.registration_id))
        .collect();
    device_set::check(&current, &requested, None)?;
    reserved(state, None, dest, send).await
}

/// The prepared send, with a mailbox slot reserved per copy (none for an
/// ephemeral send).
async fn reserved(
    state: &State,
    sender: Option<Address>,
    dest: AccountId,
    send: ValidSend,
) -> Result<Prepared, ApiError> {
    let copies = send.copies.into_iter().map(|c| (dest, c)).collect();
    Prepared::reserve(state, sender, send.ephemeral, send.timestamp, copies).await
}

impl Prepared {
    /// Copies for any number of accounts, with a mailbox slot reserved per
    /// copy (none when ephemeral); `507` if a mailbox has no room.
    pub async fn reserve(
        state: &State,
        sender: Option<Address>,
        ephemeral: bool,
        timestamp: i64,
        copies: Vec<(AccountId, DeviceCopy)>,
    ) -> Result<Prepared, ApiError> {
        let slots = if ephemeral {
            Vec::new()
        } else {
            let dests: Vec<Address> = copies
                .iter()
                .map(|(account, c)| Address::new(*account, c.device))
                .collect();
            reserve(state, &dests).await?
        };
        Ok(Prepared {
            sender,
            ephemeral,
            timestamp,
            copies,
            slots,
        })
    }
}

/// One mailbox slot in each of `dests`, or `507` if any has no room.
async fn reserve(state: &State, dests: &[Address]) -> Result<Vec<Reserved>, ApiError> {
    let quota = state.writer.quota();
    // Counts not yet known are read once, by the writer, then asked again.
    for _ in 0..2 {
        match quota.reserve(dests) {
            Reserve::Granted { slots, refresh } => {
                if !refresh.is_empty() {
                    // Read again ahead of expiry; nothing waits for it.
                    drop(state.writer.load_counts(refresh));
                }
                return Ok(slots);
            }
            Reserve::Full => return Err(ApiError::MailboxFull),
            Reserve::Unknown(unknown) => match state.writer.load_counts(unknown).await {
                Ok(Ok(_)) => {}
                _ => return Err(ApiError::Internal),
            },
        }
    }
    // Only if another sender's load evicted ours in between: a busy server.
    Err(ApiError::Unavailable)
}

/// Hands every copy on, right here, and gives back the future of the
/// answer: it resolves once each copy is acknowledged live or committed to
/// its mailbox (or, if ephemeral, pushed or dropped).
///
/// A copy for a device connected here goes straight to its session
/// ([`crate::actors::router::Live`]); one for a device that is not is
/// stored (alone) or handed to the router, which finds its node (cluster).
/// In a cluster a later send of the same connection must wait until the
/// router has taken those ([`Routed::taken`]), so that a copy of it, which
/// may find the device connected here by then, cannot overtake them.
///
/// Not `async`: on a node alone nothing here waits, and a future to poll
/// once cost a boxed 800-byte state machine per send.
pub fn route(
    state: &State,
    prepared: Prepared,
) -> Routed<impl Future<Output = Result<SendResponse, ApiError>> + use<>> {
    let server_timestamp = store::now_ms();
    let Prepared {
        sender,
        ephemeral,
        timestamp,
        copies,
        slots,
    } = prepared;
    let mut slots = slots.into_iter();
    let mut waits = Vec::with_capacity(copies.len());
    let mut to_router = Vec::new();
    for (dest, copy) in copies {
        let envelope = Arc::new(Envelope {
            guid: new_guid(),
            source: sender,
            msg_type: copy.msg_type,
            timestamp,
            server_timestamp,
            content: copy.content,
            slot: Default::default(),
        });
        let (reply, outcome) = oneshot::channel();
        let to = Address::new(dest, copy.device);
        // Before the copy is handed on: its commit may come at once.
        let mut slot = slots.next();
        if let Some(slot) = slot.as_mut() {
            slot.bind(&envelope);
        }
        let deliver = Deliver {
            envelope: envelope.clone(),
            ephemeral,
            reply,
        };
        state
            .live
            .deliver_or(to, deliver, |absent| match &state.cluster {
                // The router asks the cluster where the device is.
                Some(_) => to_router.push(state.router.send(Route {
                    dest: to,
                    envelope: absent.envelope,
                    ephemeral,
                    reply: absent.reply,
                    via: Via::Accepted,
                })),
                None => store_absent(state, to, absent),
            });
        waits.push((to, envelope, outcome, slot));
    }
    if !ephemeral {
        state.metrics.messages_accepted.inc_by(waits.len() as u64);
    }
    let writer = state.writer.clone();
    let outcome = async move {
        let mut results = Vec::with_capacity(waits.len());
        let mut failed = false;
        // Every outcome is awaited, even after a failure: a copy is either
        // acknowledged or stored before the send is answered.
        for (to, envelope, outcome, slot) in waits {
            let status = match outcome.await {
                Ok(status) => status,
                // The session ended with the copy still in its queue: store
                // it here, so an answered send is never lost.
                Err(_) if ephemeral => Ok(DeliveryStatus::Dropped),
                Err(_) => spill_status(writer.spill(to, envelope.clone()).await.unwrap_or(Err(()))),
            };
            // The copy is acknowledged, or committed (and its slot taken
            // by the commit already): the slot is free.
            drop(slot);
            match status {
                Ok(status) => results.push(SendResult {
                    device_id: to.device.0,
                    guid: envelope.guid,
                    status,
                }),
                Err(_) => failed = true,
            }
        }
        if failed {
            return Err(ApiError::Internal);
        }
        Ok(SendResponse { results })
    };
    Routed { to_router, outcome }
}

/// A routed send: its copies handed on, and the future of its answer.
pub struct Routed<O> {
    /// In a cluster: copies handed to the router, which has yet to take
    /// them.
    to_router: Vec<actix::dev::Request<Router, Route>>,
    /// The answer, once every copy's outcome is known.
    pub outcome: O,
}

impl<O> Routed<O> {
    /// Every copy is queued where it goes: a later send may be routed.
    pub fn is_taken(&self) -> bool {
        self.to_router.is_empty()
    }

    /// Waits until every copy is queued where it goes; then the answer.
    pub async fn taken(self) -> O {
        for queued in self.to_router {
            // An error means the router is gone (shutdown): the copy's
            // reply is dropped with it, and the outcome stores the copy.
            let _ = queued.await;
        }
        self.outcome
    }
}

/// A copy for a device connected nowhere (a node alone): stored, and
/// once committed its device may be woken by a push; an ephemeral copy is
/// dropped. Runs under [`crate::actors::router::Live`]'s lock, so the copy
/// is queued to the writer before the device's next session reads its
/// mailbox.
fn store_absent(state: &State, to: Address, copy: Deliver) {
    if copy.ephemeral {
        state.metrics.messages_dropped.inc();
        let _ = copy.reply.send(Ok(DeliveryStatus::Dropped));
        return;
    }
    let pusher = state.pusher.clone();
    state
        .writer
        .spill_answering_then(to, copy.envelope, copy.reply, move || {
            pusher.do_send(Wake { device: to })
        });
}

/// `prepare` then `route`, for the HTTP path. The wait runs as a task of its
/// own, so a client that hangs up does not cancel the accounting of copies
/// already routed.
pub async fn send(
    state: &State,
    from: SendAs,
    destination: &str,
    body: SendRequest,
) -> Result<SendResponse, ApiError> {
    let prepared = prepare(state, from, destination, body).await?;
    let routed = route(state, prepared);
    actix_web::rt::spawn(async move { routed.taken().await.await })
        .await
        .unwrap_or(Err(ApiError::Internal))
}

/// The oldest page of `device`'s mailbox.
pub async fn fetch(state: &State, device: Address) -> Result<MessageList, ApiError> {
    let keys = state.storage_keys.clone();
    let (envelopes, more) = store::blocking(&state.pool, move |conn| {
        // Rows that cannot be read (a storage key dropped too early) are
        // skipped, so a page may hold fewer copies than rows: read on, up to
        // a bound, rather than answer an empty page that says `more`.
        let mut envelopes = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..FETCH_SCAN_PAGES {
            let page = store::mailbox::load_page(
                conn,
                device,
                cursor.as_deref(),
                FETCH_PAGE + 1,
                keys.as_deref(),
            )
            .map_err(ApiError::from)?;
            envelopes.extend(page.envelopes);
            if envelopes.len() as i64 > FETCH_PAGE || (page.rows as i64) <= FETCH_PAGE {
                let more = envelopes.len() as i64 > FETCH_PAGE;
                return Ok::<_, ApiError>((envelopes, more));
            }
            cursor = page.cursor;
        }
        Ok((envelopes, true))
    })
    .await?;
    Ok(MessageList {
        messages: envelopes
            .iter()
            .take(FETCH_PAGE as usize)
            .map(EnvelopeJson::from)
            .collect(),
        more,
    })
}

/// Acknowledges a copy wherever it is: held by the device's live session
/// (its sender is answered `delivered`), or in its mailbox (deleted). `404`
/// when it is neither (another device's, or already gone).
pub async fn acknowledge(state: &State, device: Address, guid: &str) -> Result<(), ApiError> {
    let guid = Uuid::parse_str(guid).map_err(|_| ApiError::NotFound("no such message"))?;
    let held_live = state
        .router
        .send(AckAt { dest: device, guid })
        .await
        .unwrap_or(false);
    if held_live {
        return Ok(());
    }
    match state.writer.delete(device, guid).await {
        Ok(Ok(Outcome::Deleted)) => Ok(()),
        Ok(Ok(_)) => Err(ApiError::NotFound("no such message")),
        _ => Err(ApiError::Internal),
    }
}
