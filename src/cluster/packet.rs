//! What nodes say to each other, as JSON on Redis pub/sub. Message content
//! is base64 in it, as in the client protocol; nothing here is logged.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::NodeId;
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::envelope::Envelope;
use crate::domain::rendezvous::{ChannelId, EndReason, JoinRefused, SideRef};
use crate::wire::DeliveryStatus;

/// A device address on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub account: Uuid,
    pub device: u32,
}

impl From<Address> for Device {
    fn from(a: Address) -> Self {
        Device {
            account: a.account.0,
            device: a.device.0,
        }
    }
}

impl From<Device> for Address {
    fn from(d: Device) -> Self {
        Address::new(AccountId(d.account), DeviceId(d.device))
    }
}

/// An envelope on the bus: everything the holding node needs to push it
/// and, if it must, to store it under the same guid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BusEnvelope {
    pub guid: Uuid,
    /// `None` for a sealed-sender copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Device>,
    #[serde(rename = "type")]
    pub msg_type: i32,
    pub timestamp: i64,
    pub server_timestamp: i64,
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
}

impl From<&Envelope> for BusEnvelope {
    fn from(e: &Envelope) -> Self {
        BusEnvelope {
            guid: e.guid,
            source: e.source.map(Into::into),
            msg_type: e.msg_type,
            timestamp: e.timestamp,
            server_timestamp: e.server_timestamp,
            // A shared payload travels whole: the holding node stores the
            // copy as its own if it must.
            content: e.content.bytes().into_owned(),
        }
    }
}

impl From<BusEnvelope> for Envelope {
    fn from(e: BusEnvelope) -> Self {
        Envelope {
            guid: e.guid,
            source: e.source.map(Into::into),
            msg_type: e.msg_type,
            timestamp: e.timestamp,
            server_timestamp: e.server_timestamp,
            content: e.content.into(),
            slot: Default::default(),
        }
    }
}

/// What became of a forwarded copy on the node that holds the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confirmation {
    /// Acknowledged by the device.
    Delivered,
    /// Committed to the device's mailbox by the holding node.
    Queued,
    /// Ephemeral, and not pushed.
    Dropped,
    /// The device is not (or no longer) connected there: route it again.
    NotHere,
    /// The holding node could not store it: the accepting node stores it.
    Failed,
}

impl From<DeliveryStatus> for Confirmation {
    fn from(s: DeliveryStatus) -> Self {
        match s {
            DeliveryStatus::Delivered => Confirmation::Delivered,
            DeliveryStatus::Queued => Confirmation::Queued,
            DeliveryStatus::Dropped => Confirmation::Dropped,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Packet {
    /// Push this copy to `dest`, connected to the receiving node; answer
    /// with `Confirm { id }` once it is acknowledged or stored.
    Forward {
        from: NodeId,
        id: u64,
        dest: Device,
        envelope: BusEnvelope,
        ephemeral: bool,
    },
    Confirm {
        id: u64,
        what: Confirmation,
    },
    /// A newer connection of `device` (elsewhere) took over: close
    /// connection `conn` with 4409, spill what it holds, then answer
    /// `Evicted { id }`.
    Evict {
        from: NodeId,
        id: u64,
        device: Device,
        conn: u64,
    },
    Evicted {
        id: u64,
    },
    /// (To every node.) Devices of `account` were linked or removed
    /// (`removed`: that device, or the whole account when `device` is
    /// `None`): drop cached device sets and secrets, close removed devices'
    /// sockets, then answer `Applied { id }`.
    Changed {
        from: NodeId,
        id: u64,
        account: Uuid,
        removed: Option<Removed>,
    },
    Applied {
        id: u64,
    },
    /// A session of node `from` asks to join rendezvous channel `channel`,
    /// held by the receiving node, as visiting side `side`; answer
    /// `RendezvousJoined { id }`.
    RendezvousJoin {
        from: NodeId,
        id: u64,
        channel: ChannelId,
        side: u64,
    },
    RendezvousJoined {
        id: u64,
        outcome: Result<SideRef, JoinRefused>,
    },
    /// For visiting side `side`: what happened on its channel, in order.
    RendezvousEvent {
        side: u64,
        event: RendezvousEvent,
    },
    /// From a visiting side: a frame for the other side of its channel.
    RendezvousFrame {
        side: SideRef,
        #[serde(with = "base64_bytes")]
        frame: Vec<u8>,
    },
    /// From a visiting side: it left.
    RendezvousLeave {
        side: SideRef,
    },
    /// A copy for `device`, which the receiving node holds, was stored
    /// without reaching it (its confirmation came too late): have the
    /// device's connection read its mailbox again.
    Stored {
        device: Device,
    },
}

/// An event of a rendezvous channel, for a side on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RendezvousEvent {
    Frame(#[serde(with = "base64_bytes")] Vec<u8>),
    PeerJoined,
    PeerLeft,
    End(EndReason),
}

/// What a `Changed` packet removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Removed {
    Account,
    Device(u32),
}

impl Packet {
    pub fn encode(&self) -> Vec<u8> {
        // Only our own types, all serializable: this cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Packet> {
        serde_json::from_slice(bytes).ok()
    }
}

mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_survives_the_bus_byte_for_byte() {
        let envelope = Envelope {
            guid: Uuid::now_v7(),
            source: Some(Address::new(AccountId::random(), DeviceId(3))),
            msg_type: 1,
            timestamp: 17,
            server_timestamp: 18,
            content: (0..=255u8).collect::<Vec<u8>>().into(),
            slot: Default::default(),
        };
        let packet = Packet::Forward {
            from: NodeId::random(),
            id: 9,
            dest: Address::new(AccountId::random(), DeviceId(2)).into(),
            envelope: (&envelope).into(),
            ephemeral: false,
        };
        let Some(Packet::Forward { envelope: back, .. }) = Packet::decode(&packet.encode()) else {
            panic!("not a forward");
        };
        let back = Envelope::from(back);
        assert_eq!(back.guid, envelope.guid);
        assert_eq!(back.source, envelope.source);
        assert_eq!(back.content, envelope.content);
        assert_eq!(
            (back.msg_type, back.timestamp, back.server_timestamp),
            (1, 17, 18)
        );
        assert!(Packet::decode(b"{\"op\":\"forward\"}").is_none());
        assert!(Packet::decode(b"\xff").is_none());
    }
}
