//! The envelope a destination device receives, and the rules a send's
//! per-device copies must meet before anything is routed.

use uuid::Uuid;

use super::address::Address;

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
    pub source: Address,
    pub msg_type: i32,
    /// The sender's timestamp (ms since the epoch), passed through.
    pub timestamp: i64,
    /// When the server accepted the send (ms since the epoch).
    pub server_timestamp: i64,
    pub content: Vec<u8>,
}

/// A fresh guid. `Uuid::now_v7` is monotonic within this process, so guids
/// sort in acceptance order, which keeps per-sender order in the mailbox.
pub fn new_guid() -> Uuid {
    Uuid::now_v7()
}
