//! Sealed Sender v2 multi-recipient messages, server side: parse the body a client
//! writes with libsignal's `sealedSenderMultiRecipientEncrypt` (an SSv2 *SentMessage*)
//! and cut out, for each recipient account, the SSv2 *ReceivedMessage* its devices get,
//! byte for byte what libsignal's `SealedSenderMultiRecipientMessage.messageForRecipient`
//! produces. Pure: no I/O, no logging. The body is hostile input: every length and count
//! is checked before use and nothing here panics (unit tests, proptest and the fuzz
//! target `fuzz/fuzz_targets/sealed_v2_parse.rs` hold it to that).
//!
//! # Wire format (libsignal `rust/protocol/src/sealed_sender.rs`)
//!
//! ```text
//! SentMessage {
//!     version: u8,                 // 0x22 (recipients as raw UUIDs, ACIs implied)
//!                                  // 0x23 (ServiceId fixed-width binary; what libsignal writes)
//!     count: varint,               // protobuf varint, unsigned; entries that follow
//!     entries: [Entry; count],
//!     e_pub: [u8; 32],             // shared ephemeral Curve25519 public key
//!     ciphertext: [u8],            // the rest: AES-256-GCM-SIV(USMC) || 16-byte tag
//! }
//! Entry = Recipient | Excluded
//! Recipient { id: ServiceId, devices: [Device; 1..], c: [u8; 32], at: [u8; 16] }
//! Excluded  { id: ServiceId, 0x00 }      // named but sent nothing: no key material
//! Device    { device_id: u8 (1..=127), has_more: u1, unused: u1, registration_id: u14 }
//!                                        // the last three are one big-endian u16
//! ServiceId = 0x22: uuid [u8; 16]
//!           | 0x23: kind u8 (0x00 ACI, 0x01 PNI) || uuid [u8; 16]
//!
//! ReceivedMessage { 0x22, c, at, e_pub, ciphertext }   // always 0x22, for either input
//! ```
//!
//! # Where courier is stricter than libsignal's parser
//!
//! libsignal's `SealedSenderV2SentMessage::parse` is the reference; everything it refuses
//! is refused here. In addition:
//!
//! - **The count must be at most [`MAX_RECIPIENTS`]**, counting excluded entries too
//!   (libsignal: any `u32`; Signal-Server caps recipients at 5000).
//! - **The count must be minimally encoded.** libsignal decodes the varint with prost
//!   but then skips only the *canonical* length of the decoded value, so an over-long
//!   encoding (`81 00` for 1) makes it read the rest of the body shifted; refusing such
//!   bodies keeps courier from disagreeing with libsignal about what a body says.
//! - **A repeated recipient must repeat its key material.** libsignal's encryptor writes
//!   an account again when the caller lists its devices non-contiguously, with identical
//!   key material, and its parser merges the entries (the vector `group-interleaved` in
//!   `tests/data/sealed-sender-v2.json`); courier merges them too. libsignal does not
//!   compare the key material; courier refuses a repeat whose key material differs, since
//!   some device would get a copy it cannot decrypt. A repeat involving an excluded entry
//!   is refused, as libsignal refuses it.
//! - **A device may appear once per recipient** (libsignal leaves this to the server;
//!   Signal-Server answers 400 for duplicate devices).
//! - **Only ACIs**, as recipients and as excluded recipients: courier has no PNIs.
//!   Excluded recipients themselves are tolerated (libsignal's encryptor writes them when
//!   the client passes `excludedRecipients`); they are returned in
//!   [`SentMessage::excluded`] and receive nothing.
//! - **At least one recipient with a device** (Signal-Server: "Recipient list is empty").
//! - **The ciphertext must be at least [`MIN_CIPHERTEXT_LEN`] bytes** (libsignal accepts
//!   an empty one): the AES-GCM-SIV tag plus at least one byte of a serialized
//!   UnidentifiedSenderMessageContent, which is never empty. Anything shorter can never
//!   be decrypted.
//!
//! Like libsignal, the unused bit (`0x4000`) of a device's registration-id field is
//! ignored: the registration id is the low 14 bits.
//!
//! The ciphertext runs to the end of the body and carries no length, so bytes appended to
//! or cut from it cannot be detected here: the recipient's AEAD check does that. Bounding
//! the body's size is the HTTP layer's job.

use uuid::Uuid;

use crate::domain::address::DeviceId;

/// The most entries (recipients plus excluded recipients) one body may name.
pub const MAX_RECIPIENTS: usize = 1_000;

/// SentMessage version whose recipients are bare 16-byte UUIDs (ACIs implied).
pub const VERSION_UUID: u8 = 0x22;
/// SentMessage version whose recipients are 17-byte ServiceId fixed-width binaries;
/// the one libsignal writes.
pub const VERSION_SERVICE_ID: u8 = 0x23;
/// The version byte of every ReceivedMessage, whichever version the SentMessage had.
pub const RECEIVED_VERSION: u8 = 0x22;

/// The highest device id the format (and libsignal's `DeviceId`) allows.
pub const MAX_DEVICE_ID: u8 = 127;
/// A recipient's key material: `C_i` (32 bytes) followed by `AT_i` (16 bytes).
pub const KEY_MATERIAL_LEN: usize = 32 + 16;
/// The shared ephemeral public key `E.pub`: a bare Curve25519 key.
pub const EPHEMERAL_KEY_LEN: usize = 32;
/// The AES-256-GCM-SIV tag at the end of the shared ciphertext.
pub const CIPHERTEXT_TAG_LEN: usize = 16;
/// The shortest ciphertext that could decrypt: the tag and one byte of content.
pub const MIN_CIPHERTEXT_LEN: usize = CIPHERTEXT_TAG_LEN + 1;
/// The length of [`Recipient::prefix`]: the version byte and the key material.
pub const PREFIX_LEN: usize = 1 + KEY_MATERIAL_LEN;

const SERVICE_ID_KIND_ACI: u8 = 0x00;
const SERVICE_ID_KIND_PNI: u8 = 0x01;
const REGISTRATION_ID_MASK: u16 = 0x3FFF;
const HAS_MORE: u16 = 0x8000;
/// The longest protobuf varint (a `u64`).
const MAX_VARINT_LEN: usize = 10;
/// The smallest entry: a 16-byte UUID (0x22) and the excluded marker.
const MIN_ENTRY_LEN: usize = 16 + 1;

/// A parsed SentMessage. Borrows the body: nothing is copied until
/// [`SentMessage::received_message`] is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage<'a> {
    /// [`VERSION_UUID`] or [`VERSION_SERVICE_ID`].
    pub version: u8,
    /// The recipients that get the message, in body order; each has at least one device.
    pub recipients: Vec<Recipient<'a>>,
    /// ACIs the sender names as deliberately left out (libsignal's `excludedRecipients`),
    /// in body order. Disjoint from `recipients`; nothing is delivered to them.
    pub excluded: Vec<Uuid>,
    /// `E.pub || ciphertext`: the tail of the body, shared by every ReceivedMessage.
    shared: &'a [u8],
}

/// One recipient account of a [`SentMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient<'a> {
    /// The account (an ACI).
    pub account: Uuid,
    /// `(device, registration id)` in body order; non-empty, device ids distinct and in
    /// `1..=127`, registration ids in `0..=0x3FFF`.
    pub devices: Vec<(DeviceId, u16)>,
    /// `C_i || AT_i`, [`KEY_MATERIAL_LEN`] bytes.
    key_material: &'a [u8],
}

/// Why a body was refused. Messages say what is wrong and never echo the body's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the body is empty")]
    Empty,
    #[error("unknown Sealed Sender version: expected 0x22 or 0x23")]
    UnknownVersion,
    #[error("the body ends inside {0}")]
    Truncated(&'static str),
    #[error("the recipient count is not a valid varint")]
    MalformedCount,
    #[error("the recipient count is not minimally encoded")]
    NonCanonicalCount,
    #[error("more than {} recipients", MAX_RECIPIENTS)]
    TooManyRecipients,
    #[error("no recipient has a device")]
    NoRecipients,
    #[error("a recipient is a PNI: only ACIs are accepted")]
    PniRecipient,
    #[error("a recipient's service id is of an unknown kind")]
    UnknownServiceIdKind,
    #[error("a recipient appears more than once")]
    DuplicateRecipient,
    #[error("a device id is not in 1..=127")]
    InvalidDeviceId,
    #[error("a device appears more than once for one recipient")]
    DuplicateDevice,
    #[error("the shared ciphertext is empty")]
    EmptyCiphertext,
    #[error("the shared ciphertext is shorter than its authentication tag and content")]
    CiphertextTooShort,
}

/// Parses a SentMessage. See the module documentation for the format and the rules.
pub fn parse(body: &[u8]) -> Result<SentMessage<'_>, ParseError> {
    let (&version, rest) = body.split_first().ok_or(ParseError::Empty)?;
    if version != VERSION_UUID && version != VERSION_SERVICE_ID {
        return Err(ParseError::UnknownVersion);
    }
    let mut r = Reader(rest);
    let count = r.count()?;

    // `count` is at most MAX_RECIPIENTS, and no entry is shorter than MIN_ENTRY_LEN.
    let capacity = count.min(r.0.len() / MIN_ENTRY_LEN);
    let mut recipients: Vec<Recipient<'_>> = Vec::with_capacity(capacity);
    // Per recipient, bit n set: device n already listed (ids are at most 127).
    let mut listed: Vec<u128> = Vec::with_capacity(capacity);
    let mut excluded: Vec<Uuid> = Vec::new();
    // Where each account seen so far went: `Some(index)` into `recipients`,
    // `None` for an excluded one.
    let mut seen: std::collections::HashMap<Uuid, Option<usize>> =
        std::collections::HashMap::with_capacity(capacity);

    for _ in 0..count {
        let account = if version == VERSION_UUID {
            r.uuid()?
        } else {
            match r.byte("a recipient's service id")? {
                SERVICE_ID_KIND_ACI => r.uuid()?,
                SERVICE_ID_KIND_PNI => return Err(ParseError::PniRecipient),
                _ => return Err(ParseError::UnknownServiceIdKind),
            }
        };
        let earlier = seen.get(&account).copied();

        let mut device = r.byte("a recipient's device list")?;
        if device == 0 {
            if earlier.is_some() {
                return Err(ParseError::DuplicateRecipient);
            }
            seen.insert(account, None);
            excluded.push(account);
            continue;
        }
        let mut devices = Vec::new();
        let mut mask = match earlier {
            Some(Some(i)) => listed[i],
            Some(None) => return Err(ParseError::DuplicateRecipient),
            None => 0,
        };
        loop {
            if device == 0 || device > MAX_DEVICE_ID {
                return Err(ParseError::InvalidDeviceId);
            }
            let bit = 1u128 << device;
            if mask & bit != 0 {
                return Err(ParseError::DuplicateDevice);
            }
            mask |= bit;
            let field = r.u16("a device's registration id")?;
            devices.push((DeviceId(u32::from(device)), field & REGISTRATION_ID_MASK));
            if field & HAS_MORE == 0 {
                break;
            }
            device = r.byte("a recipient's device list")?;
        }
        let key_material = r.take(KEY_MATERIAL_LEN, "a recipient's key material")?;
        match earlier {
            // libsignal's encryptor writes an account again when its devices
            // are not listed together, with the same key material; its
            // parser merges the entries, and so does courier. Different key
            // material could not decrypt on every device: refused.
            Some(Some(i)) => {
                if recipients[i].key_material != key_material {
                    return Err(ParseError::DuplicateRecipient);
                }
                recipients[i].devices.extend(devices);
                listed[i] = mask;
            }
            _ => {
                seen.insert(account, Some(recipients.len()));
                listed.push(mask);
                recipients.push(Recipient {
                    account,
                    devices,
                    key_material,
                });
            }
        }
    }

    let shared = r.0;
    if shared.len() < EPHEMERAL_KEY_LEN {
        return Err(ParseError::Truncated("the shared ephemeral key"));
    }
    match shared.len() - EPHEMERAL_KEY_LEN {
        0 => return Err(ParseError::EmptyCiphertext),
        n if n < MIN_CIPHERTEXT_LEN => return Err(ParseError::CiphertextTooShort),
        _ => {}
    }
    if recipients.is_empty() {
        return Err(ParseError::NoRecipients);
    }
    Ok(SentMessage {
        version,
        recipients,
        excluded,
        shared,
    })
}

impl<'a> SentMessage<'a> {
    /// The bytes every device of `recipient` receives: libsignal's ReceivedMessage,
    /// `recipient.prefix() || self.shared_part()`.
    ///
    /// `recipient` should be one of `self.recipients`; any other makes a message that
    /// does not decrypt (as with libsignal's `messageForRecipient`), never a panic.
    pub fn received_message(&self, recipient: &Recipient<'a>) -> Vec<u8> {
        let mut out = Vec::with_capacity(PREFIX_LEN + self.shared.len());
        out.extend_from_slice(&recipient.prefix());
        out.extend_from_slice(self.shared);
        out
    }

    /// The part of every ReceivedMessage that is the same for all recipients,
    /// `E.pub || ciphertext`: a store may keep it once and each recipient's
    /// [`Recipient::prefix`] beside it. It is the tail of the body.
    pub fn shared_part(&self) -> &'a [u8] {
        self.shared
    }

    /// The shared ephemeral public key `E.pub` (32 bytes, no type byte).
    pub fn ephemeral_public(&self) -> &'a [u8] {
        &self.shared[..EPHEMERAL_KEY_LEN]
    }

    /// The shared ciphertext: AES-256-GCM-SIV of the UnidentifiedSenderMessageContent,
    /// tag last.
    pub fn ciphertext(&self) -> &'a [u8] {
        &self.shared[EPHEMERAL_KEY_LEN..]
    }

    /// The number of destination devices over all recipients.
    pub fn device_count(&self) -> usize {
        self.recipients.iter().map(|r| r.devices.len()).sum()
    }
}

impl<'a> Recipient<'a> {
    /// The bytes that precede [`SentMessage::shared_part`] in this recipient's
    /// ReceivedMessage: [`RECEIVED_VERSION`] and the key material `C_i || AT_i`. The same
    /// for every version of SentMessage, so no version argument is needed.
    pub fn prefix(&self) -> [u8; PREFIX_LEN] {
        let mut out = [0u8; PREFIX_LEN];
        out[0] = RECEIVED_VERSION;
        out[1..].copy_from_slice(self.key_material);
        out
    }

    /// `C_i || AT_i` as it appears in the body.
    pub fn key_material(&self) -> &'a [u8] {
        self.key_material
    }
}

/// A cursor over the unread rest of the body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(ParseError::Truncated(what))?;
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, ParseError> {
        let (&b, rest) = self.0.split_first().ok_or(ParseError::Truncated(what))?;
        self.0 = rest;
        Ok(b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn uuid(&mut self) -> Result<Uuid, ParseError> {
        let b = self.take(16, "a recipient's service id")?;
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(b);
        Ok(Uuid::from_bytes(bytes))
    }

    /// The entry count: a protobuf varint (as prost decodes one: at most ten bytes, the
    /// value a `u64`), minimally encoded, at most [`MAX_RECIPIENTS`].
    fn count(&mut self) -> Result<usize, ParseError> {
        let mut value: u64 = 0;
        for i in 0..MAX_VARINT_LEN {
            let b = self.byte("the recipient count")?;
            if i == MAX_VARINT_LEN - 1 && b > 1 {
                // Bits beyond the 64th.
                return Err(ParseError::MalformedCount);
            }
            value |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(ParseError::NonCanonicalCount);
                }
                return usize::try_from(value)
                    .ok()
                    .filter(|&n| n <= MAX_RECIPIENTS)
                    .ok_or(ParseError::TooManyRecipients);
            }
        }
        Err(ParseError::MalformedCount)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One entry of a hand-built body.
    #[derive(Clone)]
    enum Entry {
        /// kind byte (0x23 only), uuid, devices `(id, registration field as written)`, key material byte
        To(u8, Uuid, Vec<(u8, u16)>, u8),
        /// kind byte (0x23 only), uuid
        Excluded(u8, Uuid),
    }

    fn varint(mut n: u64, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    /// A body in the libsignal layout; the has-more bits are set as libsignal sets them.
    fn build(version: u8, entries: &[Entry], ciphertext_len: usize) -> Vec<u8> {
        let mut b = vec![version];
        varint(entries.len() as u64, &mut b);
        for e in entries {
            let (kind, id) = match e {
                Entry::To(k, id, ..) | Entry::Excluded(k, id) => (*k, id),
            };
            if version == VERSION_SERVICE_ID {
                b.push(kind);
            }
            b.extend_from_slice(id.as_bytes());
            match e {
                Entry::Excluded(..) => b.push(0),
                Entry::To(_, _, devices, km) => {
                    for (i, (d, reg)) in devices.iter().enumerate() {
                        let more = if i + 1 < devices.len() { HAS_MORE } else { 0 };
                        b.push(*d);
                        b.extend_from_slice(&(reg | more).to_be_bytes());
                    }
                    b.extend(std::iter::repeat_n(*km, KEY_MATERIAL_LEN));
                }
            }
        }
        b.extend(std::iter::repeat_n(0xEE, EPHEMERAL_KEY_LEN));
        b.extend((0..ciphertext_len).map(|i| i as u8));
        b
    }

    fn uuid(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn two_recipients() -> Vec<Entry> {
        vec![
            Entry::To(0, uuid(0xA1), vec![(1, 4242), (2, 0x3FFF)], 0xA0),
            Entry::To(0, uuid(0xB1), vec![(1, 7)], 0xB0),
        ]
    }

    #[test]
    fn hand_built_body_parses() {
        let body = build(VERSION_SERVICE_ID, &two_recipients(), 40);
        let m = parse(&body).unwrap();
        assert_eq!(m.version, 0x23);
        assert!(m.excluded.is_empty());
        assert_eq!(m.recipients.len(), 2);
        assert_eq!(m.recipients[0].account, uuid(0xA1));
        assert_eq!(
            m.recipients[0].devices,
            vec![(DeviceId(1), 4242), (DeviceId(2), 0x3FFF)]
        );
        assert_eq!(m.recipients[1].account, uuid(0xB1));
        assert_eq!(m.recipients[1].devices, vec![(DeviceId(1), 7)]);
        assert_eq!(m.device_count(), 3);

        let shared = &body[body.len() - 32 - 40..];
        assert_eq!(m.shared_part(), shared);
        assert_eq!(m.ephemeral_public(), &[0xEE; 32][..]);
        assert_eq!(m.ciphertext().len(), 40);
        for (r, km) in m.recipients.iter().zip([0xA0, 0xB0]) {
            let got = m.received_message(r);
            let mut want = vec![0x22];
            want.extend([km; KEY_MATERIAL_LEN]);
            want.extend_from_slice(shared);
            assert_eq!(got, want);
            assert_eq!(r.key_material(), &[km; KEY_MATERIAL_LEN][..]);
            assert_eq!([&r.prefix()[..], m.shared_part()].concat(), got);
        }
    }

    #[test]
    fn version_0x22_uses_bare_uuids_and_receives_as_0x22() {
        let body = build(VERSION_UUID, &two_recipients(), 20);
        let m = parse(&body).unwrap();
        assert_eq!(m.version, 0x22);
        assert_eq!(m.recipients[0].account, uuid(0xA1));
        assert_eq!(m.received_message(&m.recipients[1])[0], 0x22);
        // The same entries as 0x23 give the same ReceivedMessages.
        let body23 = build(VERSION_SERVICE_ID, &two_recipients(), 20);
        let m23 = parse(&body23).unwrap();
        for (a, b) in m.recipients.iter().zip(&m23.recipients) {
            assert_eq!(m.received_message(a), m23.received_message(b));
        }
    }

    #[test]
    fn excluded_recipients_are_listed_and_get_nothing() {
        let mut entries = two_recipients();
        entries.insert(1, Entry::Excluded(0, uuid(0xC1)));
        entries.push(Entry::Excluded(0, uuid(0xC2)));
        let body = build(VERSION_SERVICE_ID, &entries, 20);
        let m = parse(&body).unwrap();
        assert_eq!(m.recipients.len(), 2);
        assert_eq!(m.excluded, vec![uuid(0xC1), uuid(0xC2)]);
        // Only excluded recipients: nothing to deliver.
        let only = [Entry::Excluded(0, uuid(0xC1))];
        assert_eq!(
            parse(&build(VERSION_SERVICE_ID, &only, 20)),
            Err(ParseError::NoRecipients)
        );
        assert_eq!(
            parse(&build(VERSION_SERVICE_ID, &[], 20)),
            Err(ParseError::NoRecipients)
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        for version in [VERSION_UUID, VERSION_SERVICE_ID] {
            let mut entries = two_recipients();
            entries.insert(1, Entry::Excluded(0, uuid(0xC1)));
            // The shortest ciphertext, so that any cut shortens something checked.
            let body = build(version, &entries, MIN_CIPHERTEXT_LEN);
            assert!(parse(&body).is_ok());
            for cut in 0..body.len() {
                assert!(parse(&body[..cut]).is_err(), "{version:#x} cut at {cut}");
            }
        }
    }

    #[test]
    fn a_cut_inside_a_longer_ciphertext_is_not_detectable_here() {
        // The ciphertext carries no length: only the recipient's AEAD notices.
        let body = build(VERSION_SERVICE_ID, &two_recipients(), 40);
        let m = parse(&body[..body.len() - 5]).unwrap();
        assert_eq!(m.ciphertext().len(), 35);
    }

    #[test]
    fn version_byte() {
        let mut body = build(VERSION_SERVICE_ID, &two_recipients(), 20);
        for v in [0x00, 0x11, 0x21, 0x24, 0x32, 0x33, 0xFF] {
            body[0] = v;
            assert_eq!(parse(&body), Err(ParseError::UnknownVersion), "{v:#x}");
        }
        assert_eq!(parse(&[]), Err(ParseError::Empty));
    }

    /// A count followed by ten well-formed excluded entries.
    fn with_count(count: &[u8]) -> Vec<u8> {
        let mut b = vec![VERSION_SERVICE_ID];
        b.extend_from_slice(count);
        for i in 0..10 {
            b.push(SERVICE_ID_KIND_ACI);
            b.extend_from_slice(uuid(i).as_bytes());
            b.push(0);
        }
        b
    }

    #[test]
    fn counts() {
        let mut b = Vec::new();
        varint(MAX_RECIPIENTS as u64 + 1, &mut b);
        assert_eq!(parse(&with_count(&b)), Err(ParseError::TooManyRecipients));
        let mut b = Vec::new();
        varint(u64::from(u32::MAX), &mut b);
        assert_eq!(parse(&with_count(&b)), Err(ParseError::TooManyRecipients));
        let mut b = Vec::new();
        varint(u64::MAX, &mut b);
        assert_eq!(b.len(), 10);
        assert_eq!(parse(&with_count(&b)), Err(ParseError::TooManyRecipients));
        // Bits beyond 64, and an eleventh byte.
        let mut over = vec![0xFF; 9];
        over.push(0x02);
        assert_eq!(parse(&with_count(&over)), Err(ParseError::MalformedCount));
        assert_eq!(
            parse(&with_count(&[0x80; 11])),
            Err(ParseError::MalformedCount)
        );
        // Over-long encodings of small values.
        for enc in [&[0x81, 0x00][..], &[0x80, 0x00], &[0x82, 0x80, 0x00]] {
            assert_eq!(
                parse(&with_count(enc)),
                Err(ParseError::NonCanonicalCount),
                "{enc:x?}"
            );
        }
        // A count that runs off the end.
        assert_eq!(
            parse(&[VERSION_SERVICE_ID, 0x80]),
            Err(ParseError::Truncated("the recipient count"))
        );
        // A large count over a short body: an error, without reserving for 1000.
        assert_eq!(
            parse(&with_count(&[10])),
            Err(ParseError::Truncated("the shared ephemeral key"))
        );
        let mut b = Vec::new();
        varint(MAX_RECIPIENTS as u64, &mut b);
        assert_eq!(
            parse(&with_count(&b)),
            Err(ParseError::Truncated("a recipient's service id"))
        );
    }

    #[test]
    fn the_recipient_limit_is_inclusive() {
        let entries: Vec<Entry> = (0..MAX_RECIPIENTS as u32)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_be_bytes());
                Entry::To(0, Uuid::from_bytes(id), vec![(1, 1)], 1)
            })
            .collect();
        let body = build(VERSION_SERVICE_ID, &entries, 20);
        let m = parse(&body).unwrap();
        assert_eq!(m.recipients.len(), MAX_RECIPIENTS);
        let mut more = entries.clone();
        more.push(Entry::Excluded(0, uuid(0xFF)));
        assert_eq!(
            parse(&build(VERSION_SERVICE_ID, &more, 20)),
            Err(ParseError::TooManyRecipients)
        );
    }

    #[test]
    fn repeated_recipients() {
        let a = || Entry::To(0, uuid(0xA1), vec![(3, 1)], 0xA0);
        let x = || Entry::Excluded(0, uuid(0xA1));
        // The same account's devices in two entries with the same key
        // material (libsignal writes this): merged, in order.
        let a4 = || Entry::To(0, uuid(0xA1), vec![(4, 2)], 0xA0);
        let b = || Entry::To(0, uuid(0xB1), vec![(1, 9)], 0xB0);
        let body = build(VERSION_SERVICE_ID, &[a(), b(), a4()], 20);
        let merged = parse(&body).unwrap();
        assert_eq!(merged.recipients.len(), 2);
        assert_eq!(merged.recipients[0].account, uuid(0xA1));
        assert_eq!(
            merged.recipients[0].devices,
            vec![(DeviceId(3), 1), (DeviceId(4), 2)]
        );
        // A device repeated across the entries, or other key material: refused.
        assert_eq!(
            parse(&build(VERSION_SERVICE_ID, &[a(), b(), a()], 20)),
            Err(ParseError::DuplicateDevice)
        );
        let other = Entry::To(0, uuid(0xA1), vec![(4, 2)], 0xAF);
        assert_eq!(
            parse(&build(VERSION_SERVICE_ID, &[a(), other], 20)),
            Err(ParseError::DuplicateRecipient)
        );
        for entries in [vec![a(), x()], vec![x(), a()], vec![x(), x()]] {
            for v in [VERSION_UUID, VERSION_SERVICE_ID] {
                assert_eq!(
                    parse(&build(v, &entries, 20)),
                    Err(ParseError::DuplicateRecipient)
                );
            }
        }
    }

    #[test]
    fn devices() {
        let one = |devices: Vec<(u8, u16)>| {
            parse(&build(
                VERSION_SERVICE_ID,
                &[Entry::To(0, uuid(1), devices, 1)],
                20,
            ))
            .map(|m| m.recipients[0].devices.clone())
        };
        assert_eq!(
            one(vec![(1, 1), (2, 2), (1, 3)]),
            Err(ParseError::DuplicateDevice)
        );
        assert_eq!(one(vec![(5, 1), (5, 1)]), Err(ParseError::DuplicateDevice));
        // 0 after a has-more bit, and ids above 127.
        assert_eq!(one(vec![(1, 1), (0, 1)]), Err(ParseError::InvalidDeviceId));
        assert_eq!(one(vec![(128, 1)]), Err(ParseError::InvalidDeviceId));
        assert_eq!(
            one(vec![(1, 1), (255, 1)]),
            Err(ParseError::InvalidDeviceId)
        );
        // 127 devices, ids 1..=127: the most a recipient can have.
        let all: Vec<(u8, u16)> = (1..=127).map(|d| (d, u16::from(d))).collect();
        assert_eq!(one(all).unwrap().len(), 127);
        // The unused bit is ignored, as libsignal does; the registration id is 14 bits.
        assert_eq!(
            one(vec![(1, 0x4000 | 0x1234)]),
            Ok(vec![(DeviceId(1), 0x1234)])
        );
        assert_eq!(one(vec![(1, 0)]), Ok(vec![(DeviceId(1), 0)]));
    }

    #[test]
    fn only_acis() {
        let pni = Entry::To(1, uuid(2), vec![(1, 1)], 2);
        let mut entries = two_recipients();
        entries.push(pni);
        assert_eq!(
            parse(&build(VERSION_SERVICE_ID, &entries, 20)),
            Err(ParseError::PniRecipient)
        );
        let mut entries = two_recipients();
        entries.push(Entry::Excluded(1, uuid(2)));
        assert_eq!(
            parse(&build(VERSION_SERVICE_ID, &entries, 20)),
            Err(ParseError::PniRecipient)
        );
        for kind in [2, 0x7F, 0x80, 0xFF] {
            let entries = [Entry::To(kind, uuid(2), vec![(1, 1)], 2)];
            assert_eq!(
                parse(&build(VERSION_SERVICE_ID, &entries, 20)),
                Err(ParseError::UnknownServiceIdKind)
            );
        }
    }

    #[test]
    fn shared_tail() {
        let body = build(VERSION_SERVICE_ID, &two_recipients(), 0);
        assert_eq!(parse(&body), Err(ParseError::EmptyCiphertext));
        for n in 1..MIN_CIPHERTEXT_LEN {
            let body = build(VERSION_SERVICE_ID, &two_recipients(), n);
            assert_eq!(parse(&body), Err(ParseError::CiphertextTooShort));
        }
        let body = build(VERSION_SERVICE_ID, &two_recipients(), 0);
        assert_eq!(
            parse(&body[..body.len() - 1]),
            Err(ParseError::Truncated("the shared ephemeral key"))
        );
    }

    #[test]
    fn messages_do_not_echo_the_body() {
        // Every message is a fixed sentence: no hex, no numbers from the input.
        let all = [
            ParseError::Empty,
            ParseError::UnknownVersion,
            ParseError::Truncated("a recipient's key material"),
            ParseError::MalformedCount,
            ParseError::NonCanonicalCount,
            ParseError::TooManyRecipients,
            ParseError::NoRecipients,
            ParseError::PniRecipient,
            ParseError::UnknownServiceIdKind,
            ParseError::DuplicateRecipient,
            ParseError::InvalidDeviceId,
            ParseError::DuplicateDevice,
            ParseError::EmptyCiphertext,
            ParseError::CiphertextTooShort,
        ];
        for e in all {
            let s = e.to_string();
            assert!(!s.is_empty() && s.len() < 100, "{s}");
        }
    }

    /// What every successful parse must satisfy.
    fn check_invariants(body: &[u8], m: &SentMessage<'_>) {
        assert!(m.version == VERSION_UUID || m.version == VERSION_SERVICE_ID);
        assert!(!m.recipients.is_empty());
        assert!(m.recipients.len() + m.excluded.len() <= MAX_RECIPIENTS);
        let mut ids: Vec<Uuid> = m.recipients.iter().map(|r| r.account).collect();
        ids.extend(&m.excluded);
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
        assert!(m.ciphertext().len() >= MIN_CIPHERTEXT_LEN);
        assert!(body.ends_with(m.shared_part()));
        for r in &m.recipients {
            assert!(!r.devices.is_empty());
            let mut d: Vec<u32> = r.devices.iter().map(|(d, _)| d.0).collect();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), r.devices.len());
            assert!(d.iter().all(|&d| (1..=127).contains(&d)));
            assert!(r.devices.iter().all(|&(_, reg)| reg <= 0x3FFF));
            let rm = m.received_message(r);
            assert_eq!(rm.len(), PREFIX_LEN + m.shared_part().len());
            assert_eq!(rm[0], RECEIVED_VERSION);
        }
    }

    fn valid_body() -> Vec<u8> {
        let mut entries = two_recipients();
        entries.insert(1, Entry::Excluded(0, uuid(0xC1)));
        build(VERSION_SERVICE_ID, &entries, 24)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(m) = parse(&body) {
                check_invariants(&body, &m);
            }
        }

        #[test]
        fn arbitrary_tails_never_panic(
            version in prop_oneof![Just(VERSION_UUID), Just(VERSION_SERVICE_ID)],
            count in 0u8..4,
            tail in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut body = vec![version, count];
            body.extend(tail);
            if let Ok(m) = parse(&body) {
                check_invariants(&body, &m);
            }
        }

        #[test]
        fn mutations_of_a_valid_body_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
        ) {
            let mut body = valid_body();
            for (at, byte, op) in edits {
                let i = at.index(body.len() + 1);
                match op {
                    0 if i < body.len() => body[i] = byte,
                    1 if i < body.len() => body[i] ^= 1 << (byte % 8),
                    2 => body.insert(i, byte),
                    _ => body.truncate(i),
                }
            }
            if let Ok(m) = parse(&body) {
                check_invariants(&body, &m);
            }
        }
    }
}

/// Vectors made by libsignal itself (`tools/libsignal-vectors`): bodies from
/// `sealedSenderMultiRecipientEncrypt` and, per recipient, the ReceivedMessage from
/// libsignal's server-side `SealedSenderMultiRecipientMessage.messageForRecipient`, which
/// each recipient device was checked to decrypt.
#[cfg(test)]
mod libsignal_vectors {
    use super::*;
    use base64::Engine as _;
    use serde_json::Value;

    const VECTORS: &str = include_str!("../../tests/data/sealed-sender-v2.json");

    fn b64(v: &Value) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }

    fn vectors() -> Vec<Value> {
        let doc: Value = serde_json::from_str(VECTORS).unwrap();
        assert!(doc["generator"]
            .as_str()
            .unwrap()
            .starts_with("@signalapp/libsignal-client 0.103."));
        doc["vectors"].as_array().unwrap().clone()
    }

    #[test]
    fn accepted_vectors_match_libsignal_byte_for_byte() {
        let mut accepted = 0;
        let mut versions = std::collections::BTreeSet::new();
        for v in vectors() {
            if v["courier"] != "accept" {
                continue;
            }
            let name = v["name"].as_str().unwrap();
            let body = b64(&v["body"]);
            let m = parse(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                u64::from(m.version),
                v["version"].as_u64().unwrap(),
                "{name}"
            );
            versions.insert(m.version);

            let want: Vec<&Value> = v["recipients"].as_array().unwrap().iter().collect();
            assert_eq!(m.recipients.len(), want.len(), "{name}");
            for (got, want) in m.recipients.iter().zip(want) {
                let id = Uuid::parse_str(want["serviceId"].as_str().unwrap()).unwrap();
                assert_eq!(got.account, id, "{name}");
                let devices: Vec<(DeviceId, u16)> = want["devices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| {
                        (
                            DeviceId(d["deviceId"].as_u64().unwrap() as u32),
                            d["registrationId"].as_u64().unwrap() as u16,
                        )
                    })
                    .collect();
                assert_eq!(got.devices, devices, "{name}");
                let received = b64(&want["receivedMessage"]);
                assert_eq!(m.received_message(got), received, "{name} {id}");
                assert_eq!(
                    [&got.prefix()[..], m.shared_part()].concat(),
                    received,
                    "{name}"
                );
            }
            let excluded: Vec<Uuid> = v["excluded"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Uuid::parse_str(s.as_str().unwrap()).unwrap())
                .collect();
            assert_eq!(m.excluded, excluded, "{name}");
            accepted += 1;
        }
        assert!(accepted >= 4, "{accepted} accepted vectors");
        assert_eq!(
            versions.into_iter().collect::<Vec<_>>(),
            vec![VERSION_UUID, VERSION_SERVICE_ID]
        );
    }

    #[test]
    fn refused_vectors_are_refused_for_their_reason() {
        let mut refused = 0;
        for v in vectors() {
            let want = match v["courier"].as_str().unwrap() {
                "accept" => continue,
                "reject:pni" => ParseError::PniRecipient,
                "reject:duplicate-recipient" => ParseError::DuplicateRecipient,
                other => panic!("unknown expectation {other}"),
            };
            assert_eq!(parse(&b64(&v["body"])), Err(want), "{}", v["name"]);
            refused += 1;
        }
        assert_eq!(refused, 1);
    }

    #[test]
    fn every_truncation_of_a_libsignal_body_is_handled() {
        for v in vectors() {
            let body = b64(&v["body"]);
            let full = parse(&body);
            for cut in 0..body.len() {
                if let Ok(m) = parse(&body[..cut]) {
                    // Only a cut inside the ciphertext goes unnoticed here (the
                    // recipient's AEAD check catches it): same recipients, shorter tail.
                    let full = full.as_ref().unwrap();
                    assert_eq!(m.recipients, full.recipients);
                    assert_eq!(m.excluded, full.excluded);
                    assert_eq!(
                        m.ciphertext().len() + (body.len() - cut),
                        full.ciphertext().len()
                    );
                }
            }
        }
    }
}
