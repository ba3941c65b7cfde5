//! Helpers shared by the message tests (HTTP and WebSocket): answers,
//! mailboxes, frames and envelopes as SPEC.md describes them.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::client::{b64, send_body, unb64, TestDevice, Ws};

/// The `timestamp` every `send_body` carries.
pub const TIMESTAMP: i64 = 1_700_000_000_000;

/// Fails the test instead of hanging on a broken server.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// `deviceId → (guid, status)` from a `200 {results}` body, asserting its shape.
pub fn results(body: &Value) -> BTreeMap<u64, (String, String)> {
    let list = body["results"].as_array().expect("results array");
    let map: BTreeMap<u64, (String, String)> = list
        .iter()
        .map(|r| {
            let guid = r["guid"].as_str().expect("guid").to_owned();
            assert!(uuid_shaped(&guid), "guid {guid} is not a UUID string");
            (
                r["deviceId"].as_u64().expect("deviceId"),
                (guid, r["status"].as_str().expect("status").to_owned()),
            )
        })
        .collect();
    assert_eq!(map.len(), list.len(), "one result per device: {body}");
    map
}

pub fn uuid_shaped(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `GET /v1/messages` as `d`: `(envelopes, more)`.
pub async fn mailbox_page(d: &TestDevice) -> (Vec<Value>, bool) {
    let (status, body) = d.request(Method::GET, "/v1/messages", None).await;
    assert_eq!(status, StatusCode::OK, "GET /v1/messages: {body}");
    (
        body["messages"].as_array().expect("messages array").clone(),
        body["more"].as_bool().expect("more flag"),
    )
}

/// The envelopes of `GET /v1/messages` as `d`.
pub async fn mailbox(d: &TestDevice) -> Vec<Value> {
    mailbox_page(d).await.0
}

pub fn guids(envelopes: &[Value]) -> Vec<String> {
    envelopes
        .iter()
        .map(|e| e["guid"].as_str().expect("guid").to_owned())
        .collect()
}

/// The mailbox of `d` becomes empty (acks are committed asynchronously).
pub async fn mailbox_empties(d: &TestDevice) {
    for _ in 0..250 {
        if mailbox(d).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "mailbox of {} never emptied: {:?}",
        d.login(),
        mailbox_page(d).await
    );
}

/// Connects and reads up to `queue-empty`, asserting nothing was stored.
pub async fn connect_empty(d: &TestDevice) -> Ws {
    let mut ws = d.connect().await;
    let stored = ws.drain_queue().await;
    assert!(stored.is_empty(), "unexpected stored messages: {stored:?}");
    ws
}

/// Nothing at all arrives on `ws` for `wait` (no message frame, no close).
pub async fn assert_silent(ws: &mut Ws, wait: Duration) {
    if let Some(frame) = ws.next_within(wait).await {
        panic!("expected no frame, got {frame:?}");
    }
}

/// A frame round trip: the server handles a connection's frames in order, so
/// once this answer is back every frame sent before it (acks too) was
/// handled. Returns the frames that arrived meanwhile.
pub async fn round_trip(ws: &mut Ws) -> Vec<Value> {
    // A send frame without destination or body: answered 400 at once.
    ws.send_json(&json!({"op": "send", "id": 987_654_321u64}))
        .await;
    let mut others = Vec::new();
    loop {
        let v = ws.next_json().await;
        if v["op"] == "response" && v["id"] == 987_654_321u64 {
            assert_eq!(v["status"], 400, "{v}");
            return others;
        }
        others.push(v);
    }
}

/// The decoded `content` of an envelope.
pub fn content_of(env: &Value) -> Vec<u8> {
    unb64(env["content"].as_str().expect("content"))
}

/// Checks every envelope field against what `sender` sent.
pub fn assert_envelope(env: &Value, guid: &str, sender: &TestDevice, content: &[u8]) {
    assert_eq!(env["guid"], guid, "{env}");
    assert_eq!(env["source"], sender.uuid.as_str(), "{env}");
    assert_eq!(env["sourceDevice"], sender.device_id, "{env}");
    assert_eq!(env["type"], 1, "{env}");
    assert_eq!(env["timestamp"], TIMESTAMP, "{env}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let server_ts = env["serverTimestamp"].as_i64().expect("serverTimestamp");
    assert!(
        (now - 600_000..=now + 60_000).contains(&server_ts),
        "serverTimestamp {server_ts} is not ms since the epoch near {now}"
    );
    assert_eq!(env["content"], b64(content), "{env}");
}

/// A `send` frame (SPEC "WebSocket") carrying `send_body(copies, content, online)`.
pub fn send_frame(
    id: u64,
    dest: &str,
    copies: &[(u32, i64)],
    content: &[u8],
    online: bool,
) -> Value {
    let mut frame = send_body(copies, content, online);
    frame["op"] = json!("send");
    frame["id"] = json!(id);
    frame["destination"] = json!(dest);
    frame
}
