//! JSON bodies and WebSocket frames exactly as the SPEC spells them
//! (camelCase, binary values in standard base64). Parsing only: the rules
//! live in `domain/` and `service/`.
//!
//! The HTTP bodies derive `ToSchema` for `GET /v1/openapi.json`. Their
//! `#[schema(...)]` bounds restate the rules of `domain/` (utoipa takes only
//! literals there); `tests/openapi.rs` checks them against the constants.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::envelope::{Envelope, RawCopy, RawSend};
use crate::domain::prekeys::{RawKey, RawUpload};

// ---- accounts and devices ----

/// `POST /v1/accounts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// The device's secret: 16 to 256 bytes of printable ASCII (`0x20`–`0x7e`).
    #[schema(min_length = 16, max_length = 256, pattern = "^[ -~]{16,256}$")]
    pub password: String,
    /// The device's Signal registration id.
    #[schema(minimum = 1, maximum = 16380)]
    pub registration_id: i64,
    /// Required when the server sets `registration_token`; ignored otherwise.
    #[serde(default)]
    pub registration_token: Option<String>,
}

/// `POST /v1/devices`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkRequest {
    /// The linking code from `POST /v1/devices/provisioning`.
    pub code: String,
    /// The new device's secret: 16 to 256 bytes of printable ASCII.
    #[schema(min_length = 16, max_length = 256, pattern = "^[ -~]{16,256}$")]
    pub password: String,
    /// The new device's Signal registration id.
    #[schema(minimum = 1, maximum = 16380)]
    pub registration_id: i64,
}

/// A device that was just registered or linked.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredDevice {
    /// The account.
    #[schema(format = Uuid)]
    pub uuid: String,
    /// The device within the account (`1` for the account's first device).
    #[schema(value_type = i64, minimum = 1, maximum = 4294967295_u32)]
    pub device_id: u32,
}

/// A single-use code that links one new device to the account.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningCode {
    pub code: String,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
}

/// One device of the caller's account.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    #[schema(value_type = i64, minimum = 1, maximum = 4294967295_u32)]
    pub device_id: u32,
    #[schema(minimum = 1, maximum = 16380)]
    pub registration_id: i32,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch (refreshed at most hourly).
    pub last_seen_at: i64,
}

// ---- keys ----

/// `PUT /v1/keys`: every field but `identityKey` may be left out.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyUpload {
    /// The account's identity key: 33 bytes (`0x05` and a Curve25519 point), base64.
    #[schema(pattern = "^[A-Za-z0-9+/]{44}$")]
    pub identity_key: String,
    /// Curve25519 signed prekey (required on a device's first upload).
    #[serde(default)]
    pub signed_pre_key: Option<SignedPreKey>,
    /// Curve25519 one-time prekeys.
    #[serde(default)]
    #[schema(max_items = 100)]
    pub pre_keys: Option<Vec<PreKey>>,
    /// The Kyber1024 last-resort key.
    #[serde(default)]
    pub pq_last_resort_pre_key: Option<SignedPreKey>,
    /// Signed Kyber1024 one-time prekeys.
    #[serde(default)]
    #[schema(max_items = 100)]
    pub pq_pre_keys: Option<Vec<SignedPreKey>>,
}

/// A key signed by the identity key: Curve25519 (33 bytes) or Kyber1024 (1569 bytes).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignedPreKey {
    #[schema(value_type = i64, minimum = 0, maximum = 4294967295_u32)]
    pub key_id: u32,
    /// Standard base64 with padding.
    #[schema(
        max_length = 2100,
        pattern = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$"
    )]
    pub public_key: String,
    /// 64-byte XEdDSA signature, standard base64 with padding.
    #[schema(pattern = "^[A-Za-z0-9+/]{85}[AQgw]==$")]
    pub signature: String,
}

/// A Curve25519 one-time prekey (33 bytes).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreKey {
    #[schema(value_type = i64, minimum = 0, maximum = 4294967295_u32)]
    pub key_id: u32,
    /// Standard base64.
    #[schema(pattern = "^[A-Za-z0-9+/]{44}$")]
    pub public_key: String,
}

/// One-time keys the calling device has left.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyCount {
    /// Curve25519 one-time prekeys.
    #[schema(minimum = 0)]
    pub count: i64,
    /// Kyber one-time prekeys.
    #[schema(minimum = 0)]
    pub pq_count: i64,
}

/// A prekey bundle: the identity key and, per device, the keys to start a session.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleResponse {
    pub identity_key: String,
    pub devices: Vec<BundleDevice>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleDevice {
    #[schema(value_type = i64, minimum = 1, maximum = 4294967295_u32)]
    pub device_id: u32,
    #[schema(minimum = 1, maximum = 16380)]
    pub registration_id: i32,
    pub signed_pre_key: SignedPreKey,
    /// A one-time prekey, while the device has any left.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub pre_key: Option<PreKey>,
    /// A one-time Kyber key while any are left, then the last-resort key.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub pq_pre_key: Option<SignedPreKey>,
}

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

// ---- messages ----

/// `PUT /v1/messages/{uuid}`: one copy per current device of the destination
/// (without the sender's own device when sending to one's own account).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendRequest {
    /// The sender's timestamp, milliseconds since the epoch.
    #[schema(minimum = 0)]
    pub timestamp: i64,
    /// `true`: ephemeral, pushed to connected devices only, never stored.
    #[serde(default)]
    pub online: Option<bool>,
    /// At most one copy per device.
    #[schema(max_items = 1000)]
    pub messages: Vec<OutgoingMessage>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutgoingMessage {
    #[schema(value_type = i64, minimum = 1, maximum = 4294967295_u32)]
    pub destination_device_id: u32,
    #[schema(minimum = 1, maximum = 16380)]
    pub destination_registration_id: i64,
    /// The Signal envelope type, passed through.
    #[serde(rename = "type")]
    #[schema(minimum = -2147483648, maximum = 2147483647)]
    pub msg_type: i64,
    /// The ciphertext: 1 byte to 256 KiB, standard base64 with padding.
    #[schema(
        min_length = 4,
        max_length = 349528,
        pattern = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$"
    )]
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Acknowledged by the device over its live connection.
    Delivered,
    /// Committed to the device's mailbox.
    Queued,
    /// Ephemeral, and the device was not connected.
    Dropped,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendResult {
    #[schema(value_type = i64, minimum = 1, maximum = 4294967295_u32)]
    pub device_id: u32,
    /// The copy's id, which its device acknowledges.
    #[schema(format = Uuid)]
    pub guid: String,
    pub status: DeliveryStatus,
}

/// One result per copy, once each is acknowledged live or committed.
#[derive(Debug, Serialize, ToSchema)]
pub struct SendResponse {
    pub results: Vec<SendResult>,
}

/// An envelope as a device receives it, over WebSocket or `GET /v1/messages`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvelopeJson {
    #[schema(format = Uuid)]
    pub guid: String,
    /// The sending account.
    #[schema(format = Uuid)]
    pub source: String,
    #[schema(value_type = i64, minimum = 1, maximum = 4294967295_u32)]
    pub source_device: u32,
    #[serde(rename = "type")]
    pub msg_type: i32,
    /// The sender's timestamp.
    pub timestamp: i64,
    /// When the server accepted the send.
    pub server_timestamp: i64,
    /// The ciphertext, standard base64.
    pub content: String,
}

impl From<&Envelope> for EnvelopeJson {
    fn from(e: &Envelope) -> Self {
        EnvelopeJson {
            guid: e.guid.hyphenated().to_string(),
            source: e.source.account.to_string(),
            source_device: e.source.device.0,
            msg_type: e.msg_type,
            timestamp: e.timestamp,
            server_timestamp: e.server_timestamp,
            content: b64(&e.content),
        }
    }
}

/// The oldest page (at most 100) of the device's mailbox.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageList {
    pub messages: Vec<EnvelopeJson>,
    /// Whether more copies wait after this page.
    pub more: bool,
}

impl From<SendRequest> for RawSend {
    fn from(b: SendRequest) -> Self {
        RawSend {
            timestamp: b.timestamp,
            online: b.online.unwrap_or(false),
            copies: b
                .messages
                .into_iter()
                .map(|m| RawCopy {
                    device_id: m.destination_device_id,
                    registration_id: m.destination_registration_id,
                    msg_type: m.msg_type,
                    content: m.content,
                })
                .collect(),
        }
    }
}

impl From<SignedPreKey> for RawKey {
    fn from(k: SignedPreKey) -> Self {
        RawKey {
            key_id: k.key_id,
            public_key: k.public_key,
            signature: k.signature,
        }
    }
}

impl From<KeyUpload> for RawUpload {
    fn from(u: KeyUpload) -> Self {
        RawUpload {
            identity_key: u.identity_key,
            signed_pre_key: u.signed_pre_key.map(RawKey::from),
            pq_last_resort: u.pq_last_resort_pre_key.map(RawKey::from),
            pre_keys: u
                .pre_keys
                .unwrap_or_default()
                .into_iter()
                .map(|p| RawKey {
                    key_id: p.key_id,
                    public_key: p.public_key,
                    signature: String::new(),
                })
                .collect(),
            pq_pre_keys: u
                .pq_pre_keys
                .unwrap_or_default()
                .into_iter()
                .map(RawKey::from)
                .collect(),
        }
    }
}

// ---- WebSocket frames ----

/// Largest send body, as HTTP JSON or as one WebSocket frame: one ≤256 KiB
/// copy per device, base64.
pub const MAX_SEND_BYTES: usize = 8 * 1024 * 1024;

/// The `id` of a send frame, if it has a usable one (for answering a frame
/// refused before it is parsed whole).
pub fn frame_id(text: &str) -> Option<serde_json::Number> {
    serde_json::from_str::<FrameHead>(text)
        .ok()?
        .id
        .filter(|id| id.is_i64() || id.is_u64())
}

/// What every client frame is first read as: enough to route it and to echo
/// its `id` in an error response. Other fields are ignored here.
#[derive(Debug, Deserialize)]
pub struct FrameHead {
    #[serde(default)]
    pub op: Option<String>,
    #[serde(default)]
    pub id: Option<serde_json::Number>,
}

/// `{"op":"send","id":N,"destination":UUID, …the HTTP send body…}`.
/// The body's fields are spelled out rather than `#[serde(flatten)]`ed:
/// flatten buffers the whole frame into an intermediate tree first, which
/// was a visible cost on the hot path.
#[derive(Debug, Deserialize)]
pub struct SendFrame {
    pub destination: String,
    pub timestamp: i64,
    #[serde(default)]
    pub online: Option<bool>,
    pub messages: Vec<OutgoingMessage>,
}

impl SendFrame {
    pub fn into_parts(self) -> (String, SendRequest) {
        (
            self.destination,
            SendRequest {
                timestamp: self.timestamp,
                online: self.online,
                messages: self.messages,
            },
        )
    }
}

/// `{"op":"ack","guid":G}`.
#[derive(Debug, Deserialize)]
pub struct AckFrame {
    pub guid: String,
}

/// A client frame, classified. Parsing never fails: anything unusable is
/// `Unusable` with the reason the `error` frame gives.
#[derive(Debug)]
pub enum ClientFrame {
    Send {
        id: serde_json::Number,
        destination: String,
        body: SendRequest,
    },
    /// A `send` with a usable id but a body that does not parse: answered
    /// with a `400` response carrying that id.
    InvalidSend {
        id: serde_json::Number,
        reason: String,
    },
    Ack {
        guid: uuid::Uuid,
    },
    Unusable(&'static str),
}

/// Reads one client text frame (the WebSocket session's only parser).
pub fn parse_client_frame(text: &str) -> ClientFrame {
    let Ok(head) = serde_json::from_str::<FrameHead>(text) else {
        return ClientFrame::Unusable("frame is not a JSON object with a string op");
    };
    match head.op.as_deref() {
        Some("send") => match head.id {
            Some(id) if id.is_i64() || id.is_u64() => match serde_json::from_str::<SendFrame>(text)
            {
                Ok(f) => {
                    let (destination, body) = f.into_parts();
                    ClientFrame::Send {
                        id,
                        destination,
                        body,
                    }
                }
                Err(e) => ClientFrame::InvalidSend {
                    id,
                    reason: format!("invalid send: {e}"),
                },
            },
            _ => ClientFrame::Unusable("send frame needs an integer id"),
        },
        Some("ack") => match serde_json::from_str::<AckFrame>(text)
            .ok()
            .and_then(|a| uuid::Uuid::parse_str(&a.guid).ok())
        {
            Some(guid) => ClientFrame::Ack { guid },
            None => ClientFrame::Unusable("ack frame needs a guid"),
        },
        _ => ClientFrame::Unusable("unknown or missing op"),
    }
}

/// The `message` frame for `e`, written straight into one buffer of the
/// right size: this runs once per delivered copy, and going through
/// [`EnvelopeJson`] cost four allocations plus a JSON-escape scan of the
/// base64 content, which never needs escaping. A test pins it to the
/// serde form.
pub fn message_frame(e: &Envelope) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(e.content.len().div_ceil(3) * 4 + 224);
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        concat!(
            r#"{{"op":"message","envelope":{{"guid":"{}","source":"{}","sourceDevice":{},"#,
            r#""type":{},"timestamp":{},"serverTimestamp":{},"content":""#
        ),
        e.guid.hyphenated(),
        e.source.account,
        e.source.device.0,
        e.msg_type,
        e.timestamp,
        e.server_timestamp,
    );
    STANDARD.encode_string(&e.content, &mut out);
    out.push_str("\"}}");
    out
}

/// A `response` frame whose body is serialised once, straight from `body`
/// (not through a `serde_json::Value`).
pub fn response_frame<B: Serialize>(id: &serde_json::Number, status: u16, body: &B) -> String {
    #[derive(Serialize)]
    struct Response<'a, B> {
        op: &'static str,
        id: &'a serde_json::Number,
        status: u16,
        body: &'a B,
    }
    let frame = Response {
        op: "response",
        id,
        status,
        body,
    };
    serde_json::to_string(&frame).unwrap_or_else(|_| "{\"op\":\"error\"}".into())
}

/// Frames the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ServerFrame<'a> {
    Message {
        envelope: EnvelopeJson,
    },
    QueueEmpty,
    Response {
        id: &'a serde_json::Number,
        status: u16,
        body: Value,
    },
    Error {
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    pub fn to_text(&self) -> String {
        // Serialising these types cannot fail: no maps with non-string keys.
        serde_json::to_string(self).unwrap_or_else(|_| "{\"op\":\"error\"}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_frame_is_the_serde_form() {
        let e = Envelope {
            guid: crate::domain::envelope::new_guid(),
            source: crate::domain::address::Address {
                account: crate::domain::address::AccountId::random(),
                device: crate::domain::address::DeviceId(7),
            },
            msg_type: 3,
            timestamp: -1,
            server_timestamp: 1_700_000_000_000,
            content: (0..=255u8).collect(),
        };
        let direct: Value = serde_json::from_str(&message_frame(&e)).unwrap();
        let serde: Value = serde_json::from_str(
            &ServerFrame::Message {
                envelope: (&e).into(),
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(direct, serde);
        let empty = Envelope {
            content: Vec::new(),
            ..e
        };
        let direct: Value = serde_json::from_str(&message_frame(&empty)).unwrap();
        assert_eq!(direct["envelope"]["content"], "");
    }

    #[test]
    fn response_frame_is_the_serde_form() {
        let id = serde_json::Number::from(42u64);
        let body = serde_json::json!({"results": [{"deviceId": 1, "status": "delivered"}]});
        let direct: Value = serde_json::from_str(&response_frame(&id, 200, &body)).unwrap();
        let serde: Value = serde_json::from_str(
            &ServerFrame::Response {
                id: &id,
                status: 200,
                body: body.clone(),
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(direct, serde);
    }

    #[test]
    fn classifies_frames() {
        let send = r#"{"op":"send","id":7,"destination":"x","timestamp":1,"messages":[]}"#;
        assert!(matches!(parse_client_frame(send), ClientFrame::Send { .. }));
        let bad_body = r#"{"op":"send","id":7,"destination":"x"}"#;
        assert!(matches!(
            parse_client_frame(bad_body),
            ClientFrame::InvalidSend { .. }
        ));
        let ack = r#"{"op":"ack","guid":"01a20be5-4993-7263-9937-da3d464f9b8c"}"#;
        assert!(matches!(parse_client_frame(ack), ClientFrame::Ack { .. }));
        for unusable in [
            "",
            "not json",
            "[]",
            "7",
            r#"{"op":5}"#,
            r#"{"op":"send","id":"7"}"#,
            r#"{"op":"send","id":1.5}"#,
            r#"{"op":"send"}"#,
            r#"{"op":"ack","guid":"nope"}"#,
            r#"{"op":"dance"}"#,
            r#"{}"#,
        ] {
            assert!(
                matches!(parse_client_frame(unusable), ClientFrame::Unusable(_)),
                "{unusable:?}"
            );
        }
    }

    #[test]
    fn ids_are_echoed_as_given() {
        let big = r#"{"op":"send","id":18446744073709551615,"destination":"x"}"#;
        match parse_client_frame(big) {
            ClientFrame::InvalidSend { id, .. } => {
                assert_eq!(id.to_string(), "18446744073709551615")
            }
            other => panic!("{other:?}"),
        }
    }
}
