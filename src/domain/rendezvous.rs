//! Rendezvous rules: channel ids and the bounds on what a channel relays.
//!
//! A channel id is 8 decimal digits drawn at random (10^8 ids), so ids are
//! guessed only one join at a time, and joins are rate limited per account.

use std::fmt;
use std::str::FromStr;

use rand::{CryptoRng, Rng};
use serde::{Deserialize, Serialize};

/// How many ids there are: `00000000` to `99999999`.
const ID_SPACE: u32 = 100_000_000;

/// Largest binary frame a side may send (payload bytes). A bigger frame
/// closes that side's socket with 1009.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Channels one node holds open at most. Each holds at most 16 × 64 KiB
/// for an absent side, so this bounds the hub's memory (1 GiB at worst,
/// and only if every channel is full); past it, creating a channel is
/// `503` until some end. The per-account create limit keeps one account
/// from taking them all.
pub const MAX_OPEN_CHANNELS: usize = 1_000;

/// Frames held for a side that has not joined yet. One more closes the
/// sender's socket with 1008.
pub const MAX_HELD_FRAMES: usize = 16;

/// Which of a channel's two slots, on which channel instance. `serial` tells
/// a channel from a later one that drew the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideRef {
    pub channel: ChannelId,
    pub serial: u64,
    pub slot: usize,
}

/// Why a channel let go of a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The channel's time is up.
    Expired,
    /// The side sent more frames than may be held for an absent peer.
    TooManyHeld,
    /// The server is shutting down.
    Draining,
}

/// Why a join was refused (before the WebSocket upgrade).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinRefused {
    /// No such channel, or its time is up (or the server is draining).
    Unknown,
    /// Both slots have been taken.
    Full,
}

/// A channel id: 8 decimal digits, leading zeros included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelId(u32);

impl ChannelId {
    /// The id as a number (the cluster's key for the channel).
    pub fn number(self) -> u32 {
        self.0
    }
}

impl ChannelId {
    /// A fresh id from `rng`, a CSPRNG: the id is all a stranger lacks to
    /// join the channel.
    pub fn new_random<R: Rng + CryptoRng>(rng: &mut R) -> ChannelId {
        ChannelId(rng.gen_range(0..ID_SPACE))
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08}", self.0)
    }
}

/// Anything but exactly 8 ASCII digits is no channel.
impl FromStr for ChannelId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        s.parse().map(ChannelId).map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_eight_digits_both_ways() {
        let mut rng = rand::rngs::OsRng;
        for _ in 0..1000 {
            let id = ChannelId::new_random(&mut rng);
            let shown = id.to_string();
            assert_eq!(shown.len(), 8, "{shown}");
            assert_eq!(shown.parse::<ChannelId>(), Ok(id));
        }
        assert_eq!(ChannelId(42).to_string(), "00000042");
        assert_eq!("00000042".parse::<ChannelId>(), Ok(ChannelId(42)));
        for bad in [
            "",
            "1234567",
            "123456789",
            "1234567a",
            "+1234567",
            " 1234567",
            "１２３４５６７８",
        ] {
            assert!(bad.parse::<ChannelId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_spread_over_the_whole_space() {
        let mut rng = rand::rngs::OsRng;
        let ids: std::collections::HashSet<_> =
            (0..1000).map(|_| ChannelId::new_random(&mut rng)).collect();
        assert!(ids.len() > 990, "{}", ids.len());
        assert!(ids.iter().any(|id| id.0 < ID_SPACE / 2));
        assert!(ids.iter().any(|id| id.0 >= ID_SPACE / 2));
    }
}
