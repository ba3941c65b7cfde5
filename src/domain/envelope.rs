//! The envelope a destination device receives, and the rules a send's
//! per-device copies must meet before anything is routed.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use uuid::Uuid;

use super::address::{Address, DeviceId};

/// Largest ciphertext one copy may carry, decoded.
pub const MAX_CONTENT_BYTES: usize = 256 * 1024;

/// Registration ids are 14-bit values in libsignal (1..=16380).
pub const REGISTRATION_ID_RANGE: std::ops::RangeInclusive<i64> = 1..=16380;

/// One ciphertext for one destination device, as stored and as pushed.
///
/// The `guid` is a UUIDv7: it orders a device's mailbox by acceptance time
/// and is how the device acknowledges the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub guid: Uuid,
    /// The sending device; `None` for a sealed-sender copy, whose sender
    /// only the recipient learns (from inside the ciphertext).
    pub source: Option<Address>,
    pub msg_type: i32,
    /// The sender's timestamp (ms since the epoch), passed through.
    pub timestamp: i64,
    /// When the server accepted the send (ms since the epoch).
    pub server_timestamp: i64,
    pub content: Content,
    /// Whether this copy still holds the mailbox slot its send reserved.
    pub slot: SlotHold,
}

/// Whether a copy in memory still holds the mailbox slot its send reserved
/// (`actors::mailbox::quota`): taken once, by whichever comes first, the
/// copy's commit to the mailbox (which counts it stored instead) or its
/// sender's answer (which gives the slot back). Not part of the copy: a
/// clone holds nothing, and equality ignores it.
#[derive(Debug, Default)]
pub struct SlotHold(AtomicBool);

impl SlotHold {
    /// From now on the copy holds its slot. Before it is handed on.
    pub fn hold(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the slot was still held; it is not from here on.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl Clone for SlotHold {
    fn clone(&self) -> Self {
        SlotHold::default()
    }
}

impl PartialEq for SlotHold {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SlotHold {}

/// The part of a multi-recipient (Sealed Sender v2) message that every
/// recipient's copy ends with: held once in memory, stored once.
#[derive(Debug, PartialEq, Eq)]
pub struct SharedPayload {
    /// Names the stored payload (`mailbox_shared.id`).
    pub id: Uuid,
    pub bytes: Vec<u8>,
}

/// What a copy carries: its own ciphertext, or (a multi-recipient copy) its
/// recipient's own prefix followed by a payload shared with every other
/// copy of the send, so a send to a thousand devices holds and stores that
/// payload once.
#[derive(Debug, Clone)]
pub enum Content {
    Own(Vec<u8>),
    /// Its own ciphertext, still as the sender's base64 text, checked by
    /// [`validate_send`]: a standard-base64 text decodes only if it is the
    /// one encoding of its bytes, so it is exactly what a device must be
    /// sent. A copy relayed live is thus never decoded and encoded again;
    /// it is decoded only to be stored. `len` is the decoded length.
    Base64 {
        text: String,
        len: usize,
    },
    Shared {
        prefix: Vec<u8>,
        shared: Arc<SharedPayload>,
    },
}

/// Copies are equal if their devices receive the same bytes (a copy as
/// received and the same copy read back from the mailbox compare equal).
impl PartialEq for Content {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Content::Base64 { text: a, .. }, Content::Base64 { text: b, .. }) => a == b,
            (
                Content::Shared {
                    prefix: a,
                    shared: x,
                },
                Content::Shared {
                    prefix: b,
                    shared: y,
                },
            ) => a == b && x == y,
            _ => self.bytes() == other.bytes(),
        }
    }
}

impl Eq for Content {}

impl Content {
    /// The length of what the device receives.
    pub fn len(&self) -> usize {
        match self {
            Content::Own(bytes) => bytes.len(),
            Content::Base64 { len, .. } => *len,
            Content::Shared { prefix, shared } => prefix.len() + shared.bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the device receives (a shared copy's two parts joined).
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        match self {
            Content::Own(bytes) => Cow::Borrowed(bytes),
            // Checked when the send was validated, so it decodes.
            Content::Base64 { text, .. } => Cow::Owned(STANDARD.decode(text).unwrap_or_default()),
            Content::Shared { prefix, shared } => Cow::Owned([prefix, &shared.bytes[..]].concat()),
        }
    }

    /// What the device receives, as standard base64 (as it goes on the wire).
    pub fn base64(&self) -> Cow<'_, str> {
        match self {
            Content::Base64 { text, .. } => Cow::Borrowed(text),
            other => Cow::Owned(STANDARD.encode(other.bytes())),
        }
    }
}

thread_local! {
    /// Where [`validate_send`] decodes a copy's content only to check it:
    /// the decoded bytes are not kept (see [`Content::Base64`]), so one
    /// buffer per thread serves every send.
    static DECODE_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Above this the scratch buffer is let go after use rather than kept.
const KEEP_SCRATCH_BYTES: usize = 16 * 1024;

/// The decoded length of `text` if it is standard base64 (canonical, with
/// padding), `None` if it is not.
fn decoded_len(text: &str) -> Option<usize> {
    DECODE_SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        let ok = STANDARD.decode_vec(text.as_bytes(), scratch).is_ok();
        let len = scratch.len();
        if scratch.capacity() > KEEP_SCRATCH_BYTES {
            *scratch = Vec::new();
        }
        ok.then_some(len)
    })
}

impl From<Vec<u8>> for Content {
    fn from(bytes: Vec<u8>) -> Self {
        Content::Own(bytes)
    }
}

/// A fresh guid. `Uuid::now_v7` is monotonic within this process, so guids
/// sort in acceptance order, which keeps per-sender order in the mailbox.
pub fn new_guid() -> Uuid {
    Uuid::now_v7()
}

/// Copies one send may carry; a send beyond it cannot match any account.
pub const MAX_COPIES: usize = 1_000;

/// One validated per-device ciphertext of a send, before it has a guid.
#[derive(Debug)]
pub struct DeviceCopy {
    pub device: DeviceId,
    pub registration_id: i64,
    pub msg_type: i32,
    pub content: Content,
}

/// A send as the client wrote it (the wire layer turns its JSON into this).
#[derive(Debug, Clone)]
pub struct RawSend {
    pub timestamp: i64,
    pub online: bool,
    pub copies: Vec<RawCopy>,
}

/// One copy as the client wrote it: content still base64 text.
#[derive(Debug, Clone)]
pub struct RawCopy {
    pub device_id: u32,
    pub registration_id: i64,
    pub msg_type: i64,
    pub content: String,
}

/// A send body that passed the shape checks.
#[derive(Debug)]
pub struct ValidSend {
    /// `online: true`: live only, never stored.
    pub ephemeral: bool,
    pub timestamp: i64,
    pub copies: Vec<DeviceCopy>,
}

/// Why a send body is refused before any lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum SendRefusal {
    /// `400`.
    Malformed(String),
    /// `413`: a copy exceeds [`MAX_CONTENT_BYTES`].
    TooLarge(String),
}

/// Shape, size and encoding of a send body: at most one copy per device,
/// registration ids in range, content non-empty standard base64 of at most
/// 256 KiB. Pure.
pub fn validate_send(body: RawSend) -> Result<ValidSend, SendRefusal> {
    use SendRefusal::{Malformed, TooLarge};
    if body.timestamp < 0 {
        return Err(Malformed(
            "timestamp must be milliseconds since the epoch".into(),
        ));
    }
    if body.copies.len() > MAX_COPIES {
        return Err(Malformed("too many copies in one send".into()));
    }
    // Most sends have a few copies: a set is built only for many.
    let mut seen = (body.copies.len() > 16).then(BTreeSet::new);
    let mut copies: Vec<DeviceCopy> = Vec::with_capacity(body.copies.len());
    for (i, m) in body.copies.into_iter().enumerate() {
        if m.device_id == 0 {
            return Err(Malformed(format!(
                "messages[{i}].destinationDeviceId must be positive"
            )));
        }
        let repeated = match seen.as_mut() {
            Some(seen) => !seen.insert(m.device_id),
            None => copies.iter().any(|c| c.device.0 == m.device_id),
        };
        if repeated {
            return Err(Malformed(format!(
                "messages[{i}]: more than one copy for device {}",
                m.device_id
            )));
        }
        if !REGISTRATION_ID_RANGE.contains(&m.registration_id) {
            return Err(Malformed(format!(
                "messages[{i}].destinationRegistrationId must be in 1..=16380"
            )));
        }
        let msg_type = i32::try_from(m.msg_type)
            .map_err(|_| Malformed(format!("messages[{i}].type is out of range")))?;
        // Reject by encoded length first so a huge string is never decoded.
        if m.content.len() > MAX_CONTENT_BYTES.div_ceil(3) * 4 {
            return Err(TooLarge(format!("messages[{i}].content exceeds 256 KiB")));
        }
        let len = decoded_len(&m.content)
            .ok_or_else(|| Malformed(format!("messages[{i}].content is not standard base64")))?;
        if len == 0 {
            return Err(Malformed(format!("messages[{i}].content is empty")));
        }
        if len > MAX_CONTENT_BYTES {
            return Err(TooLarge(format!("messages[{i}].content exceeds 256 KiB")));
        }
        copies.push(DeviceCopy {
            device: DeviceId(m.device_id),
            registration_id: m.registration_id,
            msg_type,
            content: Content::Base64 {
                text: m.content,
                len,
            },
        });
    }
    Ok(ValidSend {
        ephemeral: body.online,
        timestamp: body.timestamp,
        copies,
    })
}

#[cfg(test)]
impl Envelope {
    /// A one-byte copy from nobody, holding no slot: for unit tests.
    pub(crate) fn test_copy() -> Envelope {
        Envelope {
            guid: Uuid::now_v7(),
            source: None,
            msg_type: 1,
            timestamp: 0,
            server_timestamp: 0,
            content: vec![1].into(),
            slot: SlotHold::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_taken_once_and_a_clone_holds_none() {
        let copy = Envelope::test_copy();
        assert!(!copy.slot.take(), "nothing held until told");
        copy.slot.hold();
        let clone = copy.clone();
        assert_eq!(clone, copy, "the hold is not part of the copy");
        assert!(!clone.slot.take(), "a clone holds nothing");
        assert!(copy.slot.take());
        assert!(!copy.slot.take(), "taken once");
    }

    fn msg(device: u32, content: &str) -> RawCopy {
        RawCopy {
            device_id: device,
            registration_id: 7,
            msg_type: 1,
            content: content.into(),
        }
    }

    fn body(copies: Vec<RawCopy>) -> RawSend {
        RawSend {
            timestamp: 1,
            online: false,
            copies,
        }
    }

    #[test]
    fn accepts_a_well_formed_send() {
        let send = validate_send(body(vec![msg(1, "aGk="), msg(2, "aGk=")])).unwrap();
        assert!(!send.ephemeral);
        assert_eq!(send.timestamp, 1);
        assert_eq!(send.copies.len(), 2);
        assert_eq!(send.copies[0].content.bytes(), &b"hi"[..]);
        assert_eq!(send.copies[0].content.len(), 2);
    }

    #[test]
    fn a_valid_copy_keeps_its_text_which_is_the_encoding_of_its_bytes() {
        let text = STANDARD.encode((0u8..=255).collect::<Vec<_>>());
        let send = validate_send(body(vec![msg(1, &text)])).unwrap();
        let content = &send.copies[0].content;
        assert!(matches!(content, Content::Base64 { .. }));
        assert_eq!(content.base64(), text.as_str());
        assert_eq!(content.len(), 256);
        assert_eq!(STANDARD.encode(content.bytes()), text);
        // Equal to the same bytes held decoded (as read from the mailbox).
        assert_eq!(*content, Content::Own((0u8..=255).collect()));
        assert_ne!(*content, Content::Own(b"other".to_vec()));
    }

    #[test]
    fn a_text_that_is_not_the_one_encoding_of_its_bytes_is_refused() {
        // "aGk=" is "hi"; "aGl=" sets bits the padding says are unused, and
        // would reach devices as a text that differs from its bytes.
        for text in ["aGl=", "aGk", "aGk==", "aG k=", "aGk=\n", "aGk-"] {
            assert!(
                matches!(
                    validate_send(body(vec![msg(1, text)])),
                    Err(SendRefusal::Malformed(_))
                ),
                "{text:?} accepted"
            );
        }
    }

    #[test]
    fn a_shared_copy_is_its_prefix_then_the_shared_payload() {
        let shared = Arc::new(SharedPayload {
            id: Uuid::nil(),
            bytes: b"payload".to_vec(),
        });
        let copy = Content::Shared {
            prefix: b"pre-".to_vec(),
            shared,
        };
        assert_eq!(copy.len(), 11);
        assert_eq!(copy.bytes(), &b"pre-payload"[..]);
        assert_eq!(Content::from(b"own".to_vec()).bytes(), &b"own"[..]);
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
            assert!(matches!(
                validate_send(case),
                Err(SendRefusal::Malformed(_))
            ));
        }
        let mut m = msg(1, "aGk=");
        m.registration_id = 16381;
        assert!(matches!(
            validate_send(body(vec![m])),
            Err(SendRefusal::Malformed(_))
        ));
        let mut m = msg(1, "aGk=");
        m.msg_type = i64::from(i32::MAX) + 1;
        assert!(matches!(
            validate_send(body(vec![m])),
            Err(SendRefusal::Malformed(_))
        ));
    }

    #[test]
    fn refuses_oversize_content_with_413() {
        let big = STANDARD.encode(vec![0u8; MAX_CONTENT_BYTES + 1]);
        assert!(matches!(
            validate_send(body(vec![msg(1, &big)])),
            Err(SendRefusal::TooLarge(_))
        ));
        let max = STANDARD.encode(vec![0u8; MAX_CONTENT_BYTES]);
        assert!(validate_send(body(vec![msg(1, &max)])).is_ok());
    }
}
