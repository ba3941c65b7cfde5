//! HTTP request and response bodies, and their conversion to the domain's
//! raw inputs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
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

/// A new rendezvous channel.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RendezvousChannel {
    /// 8 decimal digits: the path of `GET /v1/rendezvous/{channel}`.
    #[schema(pattern = "^[0-9]{8}$", example = "04817263")]
    pub channel: String,
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

impl DeliveryStatus {
    /// The serde name (for frames written by hand).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Dropped => "dropped",
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendResult {
    #[schema(value_type = i64, minimum = 1, maximum = 4294967295_u32)]
    pub device_id: u32,
    /// The copy's id, which its device acknowledges.
    #[schema(value_type = String, format = Uuid)]
    pub guid: uuid::Uuid,
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
    /// The sending account; absent for a sealed-sender copy (type 6).
    #[schema(format = Uuid)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295_u32)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_device: Option<u32>,
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
            source: e.source.map(|s| s.account.to_string()),
            source_device: e.source.map(|s| s.device.0),
            msg_type: e.msg_type,
            timestamp: e.timestamp,
            server_timestamp: e.server_timestamp,
            content: e.content.base64().into_owned(),
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

// ---- push ----

/// `PUT /v1/push`: a browser's `PushSubscription` as `toJSON()` gives it
/// (`expirationTime` and any other member are ignored).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushSubscription {
    /// The push service URL: `https://`, at most 2048 characters, and its
    /// host must not resolve to a loopback, private or other special address.
    #[schema(max_length = 2048, example = "https://push.example.net/wpush/v2/gAAAA")]
    pub endpoint: String,
    pub keys: PushKeys,
}

/// The subscription's keys (RFC 8291), base64url (padding optional).
#[derive(Debug, Deserialize, ToSchema)]
pub struct PushKeys {
    /// The user agent's P-256 public key, uncompressed (65 bytes).
    pub p256dh: String,
    /// The 16-byte authentication secret.
    pub auth: String,
}

/// `GET /v1/push/vapid-key`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VapidKey {
    /// The server's VAPID public key (RFC 8292): the uncompressed P-256
    /// point, base64url without padding; a client passes it as
    /// `applicationServerKey` when it subscribes.
    pub public_key: String,
}

/// `GET /v1/certificate/trust-root`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustRoot {
    /// The trust root's public key: 33 bytes (`0x05` + Curve25519), standard
    /// base64. Sealed-sender clients validate sender certificates against it.
    pub public_key: String,
}

/// `GET /v1/certificate/delivery`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCertificate {
    /// A libsignal `SenderCertificate` (protobuf), standard base64.
    pub certificate: String,
}

/// `PUT /v1/accounts/attributes`: who may send to the account without
/// identifying themselves (sealed sender).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccountAttributes {
    /// The account's unidentified-access key: 16 bytes, standard base64;
    /// `null` removes it.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9+/]{21}[AQgw]==$")]
    pub unidentified_access_key: Option<String>,
    /// `true`: anyone may send sealed-sender messages to the account,
    /// whatever key they present.
    #[serde(default)]
    pub unrestricted_unidentified_access: bool,
}

/// `PUT /v1/messages/multi_recipient` query: the sender's timestamp and
/// whether the message is ephemeral.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MultiRecipientQuery {
    /// The sender's timestamp, milliseconds since the epoch.
    #[param(minimum = 0)]
    pub ts: i64,
    /// `true`: ephemeral, pushed to connected devices only, never stored.
    #[serde(default)]
    pub online: bool,
}

/// `PUT /v1/messages/multi_recipient` answer: every copy is acknowledged or
/// stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct MultiRecipientResponse {
    /// Recipient accounts that do not exist: always empty, since an unknown
    /// recipient refuses the whole send with `404`.
    #[schema(value_type = Vec<String>)]
    pub uuids404: Vec<String>,
}

/// `PUT /v1/messages/multi_recipient` body, for the OpenAPI document only: a
/// Sealed Sender v2 SentMessage as raw bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct MultiRecipientBody(Vec<u8>);
