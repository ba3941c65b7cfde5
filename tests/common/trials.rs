//! What the crash trials share (`tests/crash.rs`, `tests/cluster_crash.rs`):
//! devices that listen over every connection of a run and record what they
//! saw, and the final drain that reads every mailbox empty.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use super::{b64, TestDevice};

/// Contents each device has seen, over every connection of the whole run.
pub type Seen = Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>;

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Records every pushed copy; acks it unless `ack` is false. Says `ready`
/// once the mailbox replay is over (`queue-empty`; or after 5 s, since a
/// device that never acks may hold the replay at its bound).
pub async fn listen(
    device: TestDevice,
    seen: Seen,
    ack: bool,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let Ok(mut ws) = connect(&device).await else {
        return;
    };
    let mut ready = ready;
    let replay_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let frame = if ready.is_some() {
            match tokio::time::timeout_at(replay_deadline, ws.next()).await {
                Ok(f) => f,
                Err(_) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    continue;
                }
            }
        } else {
            ws.next().await
        };
        let Some(Ok(frame)) = frame else { return };
        let Message::Text(text) = frame else { continue };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if v["op"] == "queue-empty" {
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            continue;
        }
        if v["op"] != "message" {
            continue;
        }
        record(&seen, &device.uuid, &v["envelope"]);
        if ack {
            let guid = v["envelope"]["guid"].clone();
            if ws
                .send(Message::Text(
                    json!({"op": "ack", "guid": guid}).to_string(),
                ))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Connects until a connection replays nothing: every stored copy is seen
/// and acked.
pub async fn drain_all(device: &TestDevice, seen: &Seen) {
    for _ in 0..50 {
        let mut ws = tokio::time::timeout(Duration::from_secs(20), connect(device))
            .await
            .expect("final connection within 20 s")
            .expect("final connection");
        let mut got = 0;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), ws.next())
                .await
                .expect("frames during the final drain");
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
                other => panic!("final drain connection ended: {other:?}"),
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["op"] == "queue-empty" {
                break;
            }
            if v["op"] == "message" {
                got += 1;
                record(seen, &device.uuid, &v["envelope"]);
                let guid = v["envelope"]["guid"].clone();
                ws.send(Message::Text(
                    json!({"op": "ack", "guid": guid}).to_string(),
                ))
                .await
                .unwrap();
            }
        }
        // Let the acks commit before the next look.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = ws.close(None).await;
        if got == 0 {
            return;
        }
    }
    panic!("the mailbox of {} never drained", device.login());
}

pub fn record(seen: &Seen, device: &str, envelope: &Value) {
    let content = envelope["content"].as_str().unwrap_or_default();
    let bytes = base64_decode(content);
    seen.lock()
        .unwrap()
        .entry(device.to_owned())
        .or_default()
        .insert(String::from_utf8_lossy(&bytes).into_owned());
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default()
}

pub async fn connect(d: &TestDevice) -> Result<WsStream, tokio_tungstenite::tungstenite::Error> {
    let url = d.base.replacen("http://", "ws://", 1) + "/v1/websocket";
    let mut req = url.into_client_request()?;
    let token = b64(format!("{}:{}", d.login(), d.password).as_bytes());
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Basic {token}")).expect("header"),
    );
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}
