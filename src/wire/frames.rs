//! WebSocket frames: parsing what clients send, writing what the server
//! sends.

use serde::{Deserialize, Serialize};

use serde_json::Value;

use super::{EnvelopeJson, OutgoingMessage, SendRequest, SendResponse};
use crate::domain::envelope::Envelope;

// ---- WebSocket frames ----

/// Rendezvous: sent to a side when the other side is there.
pub const PEER_JOINED_FRAME: &str = r#"{"op":"peer-joined"}"#;
/// Rendezvous: sent to a side when the other side has left.
pub const PEER_LEFT_FRAME: &str = r#"{"op":"peer-left"}"#;

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
    /// Sealed sender, on an unidentified connection only: the destination
    /// account's access key, base64.
    #[serde(default, rename = "unidentifiedAccessKey")]
    pub unidentified_access_key: Option<String>,
}

impl SendFrame {
    pub fn into_parts(self) -> (String, Option<String>, SendRequest) {
        (
            self.destination,
            self.unidentified_access_key,
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
        /// `unidentifiedAccessKey`, if the frame carries one.
        access_key: Option<String>,
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

/// Every field a client frame may carry, read in one pass, its strings
/// borrowed from the frame. Reading the head
/// first and then the frame again (as [`parse_client_frame_in_two`] does)
/// scanned every ciphertext twice, a visible share of the send path.
///
/// The strings are `&str`: a string with an escape cannot be borrowed, so
/// such a frame fails here and is read by the two-pass reader instead.
/// (`Option<Cow<str>>` would not borrow at all: serde borrows a `Cow` only
/// as a field of its own, so every frame paid an allocation per string.)
#[derive(Deserialize)]
struct AnyFrame<'a> {
    #[serde(borrow, default)]
    op: Option<&'a str>,
    #[serde(default)]
    id: Option<serde_json::Number>,
    #[serde(borrow, default)]
    destination: Option<&'a str>,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    online: Option<bool>,
    #[serde(default)]
    messages: Option<Vec<OutgoingMessage>>,
    #[serde(default, rename = "unidentifiedAccessKey")]
    unidentified_access_key: Option<String>,
    #[serde(borrow, default)]
    guid: Option<&'a str>,
}

/// Reads one client text frame (the WebSocket session's only parser).
///
/// A well-formed `send` or `ack` is read in one pass; anything else (a
/// frame to refuse, or one whose other fields have unexpected types) is
/// read again by [`parse_client_frame_in_two`], which decides exactly how
/// it is answered.
pub fn parse_client_frame(text: &str) -> ClientFrame {
    if let Ok(f) = serde_json::from_str::<AnyFrame>(text) {
        match f.op {
            Some("send") => {
                if let (Some(id), Some(destination), Some(timestamp), Some(messages)) =
                    (f.id, f.destination, f.timestamp, f.messages)
                {
                    if id.is_i64() || id.is_u64() {
                        return ClientFrame::Send {
                            id,
                            destination: destination.to_owned(),
                            access_key: f.unidentified_access_key,
                            body: SendRequest {
                                timestamp,
                                online: f.online,
                                messages,
                            },
                        };
                    }
                }
            }
            Some("ack") => {
                if let Some(guid) = f.guid.and_then(|g| uuid::Uuid::parse_str(g).ok()) {
                    return ClientFrame::Ack { guid };
                }
            }
            _ => {}
        }
    }
    parse_client_frame_in_two(text)
}

/// The head first (`op` and `id`), then the frame as its `op` says: the
/// reference reading, whose answers [`parse_client_frame`] keeps.
pub fn parse_client_frame_in_two(text: &str) -> ClientFrame {
    let Ok(head) = serde_json::from_str::<FrameHead>(text) else {
        return ClientFrame::Unusable("frame is not a JSON object with a string op");
    };
    match head.op.as_deref() {
        Some("send") => match head.id {
            Some(id) if id.is_i64() || id.is_u64() => match serde_json::from_str::<SendFrame>(text)
            {
                Ok(f) => {
                    let (destination, access_key, body) = f.into_parts();
                    ClientFrame::Send {
                        id,
                        destination,
                        access_key,
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

/// The `message` frame for `e`.
pub fn message_frame(e: &Envelope) -> String {
    let mut out = String::new();
    write_message_frame(&mut out, e);
    out
}

/// Writes the `message` frame for `e` onto `out`, straight from the
/// envelope: this runs once per delivered copy, and going through
/// [`EnvelopeJson`] cost four allocations plus a JSON-escape scan of the
/// base64 content, which never needs escaping. A test pins it to the
/// serde form.
pub fn write_message_frame(out: &mut String, e: &Envelope) {
    use std::fmt::Write as _;
    // Room for the whole frame at once: base64 content plus at most ~220
    // bytes of the rest.
    out.reserve(e.content.len().div_ceil(3) * 4 + 224);
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        r#"{{"op":"message","envelope":{{"guid":"{}","#,
        e.guid.hyphenated()
    );
    if let Some(source) = e.source {
        let _ = write!(
            out,
            r#""source":"{}","sourceDevice":{},"#,
            source.account, source.device.0
        );
    }
    let _ = write!(
        out,
        r#""type":{},"timestamp":{},"serverTimestamp":{},"content":""#,
        e.msg_type, e.timestamp, e.server_timestamp,
    );
    out.push_str(&e.content.base64());
    out.push_str("\"}}");
}

/// The `200` answer to a `send` frame.
pub fn send_response_frame(id: &serde_json::Number, r: &SendResponse) -> String {
    let mut out = String::new();
    write_send_response_frame(&mut out, id, r);
    out
}

/// Writes the `200` answer to a `send` frame onto `out`, straight like
/// [`write_message_frame`] (it runs once per send). A test pins it to the
/// serde form.
pub fn write_send_response_frame(out: &mut String, id: &serde_json::Number, r: &SendResponse) {
    use std::fmt::Write as _;
    out.reserve(64 + r.results.len() * 96);
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        r#"{{"op":"response","id":{id},"status":200,"body":{{"results":["#
    );
    for (i, result) in r.results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"deviceId":{},"guid":"{}","status":"{}"}}"#,
            result.device_id,
            result.guid.hyphenated(),
            result.status.as_str()
        );
    }
    out.push_str("]}}");
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
