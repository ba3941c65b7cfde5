//! A test client speaking the SPEC over real HTTP and WebSocket connections.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::TestServer;

/// The libsignal-made key vectors (`tests/data/libsignal-keys.json`).
pub fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/libsignal-keys.json"
    );
    let text = std::fs::read_to_string(path).expect("read tests/data/libsignal-keys.json");
    serde_json::from_str(&text).expect("vectors are JSON")
}

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Standard base64 decoding; panics on anything else.
pub fn unb64(s: &str) -> Vec<u8> {
    STANDARD.decode(s).expect("standard base64")
}

/// A registered device and its credentials.
#[derive(Debug, Clone)]
pub struct TestDevice {
    pub base: String,
    pub uuid: String,
    pub device_id: u32,
    pub password: String,
    pub registration_id: i64,
}

static NEXT_REG: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

fn next_registration_id() -> i64 {
    NEXT_REG.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 16000 + 1
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Sends a request and returns `(status, JSON body or Null)`.
pub async fn call(
    method: Method,
    url: &str,
    auth: Option<(&str, &str)>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut req = http().request(method, url);
    if let Some((user, password)) = auth {
        req = req.basic_auth(user, Some(password));
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let res = req.send().await.expect("request");
    let status = res.status();
    let text = res.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

impl TestDevice {
    /// `POST /v1/accounts`, asserting 201.
    pub async fn register(server: &TestServer) -> TestDevice {
        Self::register_at(&server.url("")).await
    }

    /// `POST /v1/accounts` on the server at `base` (`http://host:port`).
    pub async fn register_at(base: &str) -> TestDevice {
        let password = format!("pw-{}-{}", uuid_like(), "0123456789");
        let registration_id = next_registration_id();
        let (status, body) = call(
            Method::POST,
            &format!("{base}/v1/accounts"),
            None,
            Some(&json!({"password": password, "registrationId": registration_id})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "register: {body}");
        TestDevice {
            base: base.to_owned(),
            uuid: body["uuid"].as_str().expect("uuid").to_owned(),
            device_id: body["deviceId"].as_u64().expect("deviceId") as u32,
            password,
            registration_id,
        }
    }

    /// Provisioning code from this (primary) device, then `POST /v1/devices`.
    pub async fn link(&self) -> TestDevice {
        let (status, body) = self
            .request(Method::POST, "/v1/devices/provisioning", None)
            .await;
        assert_eq!(status, StatusCode::CREATED, "provisioning: {body}");
        let code = body["code"].as_str().expect("code").to_owned();
        let password = format!("pw-{}-{}", uuid_like(), "linked0000");
        let registration_id = next_registration_id();
        let (status, body) = call(
            Method::POST,
            &format!("{}/v1/devices", self.base),
            None,
            Some(&json!({"code": code, "password": password, "registrationId": registration_id})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "link: {body}");
        assert_eq!(body["uuid"].as_str(), Some(self.uuid.as_str()));
        TestDevice {
            base: self.base.clone(),
            uuid: self.uuid.clone(),
            device_id: body["deviceId"].as_u64().expect("deviceId") as u32,
            password,
            registration_id,
        }
    }

    pub fn login(&self) -> String {
        format!("{}.{}", self.uuid, self.device_id)
    }

    /// An authenticated request as this device.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let login = self.login();
        call(
            method,
            &format!("{}{}", self.base, path),
            Some((&login, &self.password)),
            body,
        )
        .await
    }

    /// `PUT /v1/keys` with a `valid[]` vector entry (identity key, signed
    /// prekey, Kyber last resort, one-time keys). Returns the status.
    pub async fn upload_vector(&self, index: usize) -> StatusCode {
        let v = vectors()["valid"][index].clone();
        self.request(Method::PUT, "/v1/keys", Some(&v)).await.0
    }

    /// `PUT /v1/messages/{dest}` with one copy per `(deviceId, registrationId)`.
    pub async fn send(
        &self,
        dest: &str,
        copies: &[(u32, i64)],
        content: &[u8],
    ) -> (StatusCode, Value) {
        let body = send_body(copies, content, false);
        self.request(Method::PUT, &format!("/v1/messages/{dest}"), Some(&body))
            .await
    }

    /// The `/v1/websocket` request with HTTP Basic credentials.
    fn ws_request(&self) -> Request {
        let url = self.base.replacen("http://", "ws://", 1) + "/v1/websocket";
        let mut req = url.into_client_request().expect("ws request");
        let token = b64(format!("{}:{}", self.login(), self.password).as_bytes());
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Basic {token}")).expect("header"),
        );
        req
    }

    /// Opens `/v1/websocket` with HTTP Basic credentials.
    pub async fn connect(&self) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(self.ws_request())
            .await
            .expect("ws connect");
        Ws { stream }
    }

    /// As [`TestDevice::connect`], over a socket whose receive buffer is
    /// `rcvbuf` bytes (set before connecting, so the advertised window
    /// stays small): a client that does not read stops taking the
    /// server's output almost at once.
    pub async fn connect_small_window(&self, rcvbuf: usize) -> Ws {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let addr: std::net::SocketAddr = self
            .base
            .trim_start_matches("http://")
            .parse()
            .expect("base is http://IP:PORT");
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        socket.connect(&SockAddr::from(addr)).expect("connect");
        socket.set_nonblocking(true).expect("nonblocking");
        let tcp = TcpStream::from_std(socket.into()).expect("tokio socket");
        let (stream, _) =
            tokio_tungstenite::client_async(self.ws_request(), MaybeTlsStream::Plain(tcp))
                .await
                .expect("ws connect");
        Ws { stream }
    }

    /// The `(deviceId, registrationId)` pair addressing this device.
    pub fn target(&self) -> (u32, i64) {
        (self.device_id, self.registration_id)
    }
}

pub fn send_body(copies: &[(u32, i64)], content: &[u8], online: bool) -> Value {
    json!({
        "timestamp": super::delivery::TIMESTAMP,
        "online": online,
        "messages": copies.iter().map(|(d, r)| json!({
            "destinationDeviceId": d,
            "destinationRegistrationId": r,
            "type": 1,
            "content": b64(content),
        })).collect::<Vec<_>>(),
    })
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{n:x}{:x}",
        NEXT_REG.load(std::sync::atomic::Ordering::Relaxed)
    )
}

/// A WebSocket connection as a device.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What arrived on a WebSocket.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    Closed(Option<u16>),
}

impl Ws {
    /// Opens `/v1/websocket` with no credentials at all: an unidentified
    /// (sealed-sender) connection.
    pub async fn unidentified(base: &str) -> Ws {
        let url = base.replacen("http://", "ws://", 1) + "/v1/websocket";
        let req = url.into_client_request().expect("ws request");
        let (stream, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("ws connect");
        Ws { stream }
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.stream
            .send(Message::Text(v.to_string()))
            .await
            .expect("ws send");
    }

    pub async fn send_text(&mut self, t: &str) {
        self.stream
            .send(Message::Text(t.to_owned()))
            .await
            .expect("ws send");
    }

    /// The next JSON frame or close, skipping pings; `None` on timeout.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stream.next()).await {
                Err(_) => return None,
                Ok(None) => return Some(Frame::Closed(None)),
                Ok(Some(Err(_))) => return Some(Frame::Closed(None)),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(Frame::Json(
                        serde_json::from_str(&t).expect("server frame is JSON"),
                    ))
                }
                Ok(Some(Ok(Message::Close(c)))) => {
                    return Some(Frame::Closed(c.map(|c| u16::from(c.code))))
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next JSON frame, panicking on close or after 10 s.
    pub async fn next_json(&mut self) -> Value {
        match self.next_within(Duration::from_secs(10)).await {
            Some(Frame::Json(v)) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Reads frames until one with `op`; the skipped ones are returned too.
    pub async fn until_op(&mut self, op: &str) -> (Value, Vec<Value>) {
        let mut skipped = Vec::new();
        loop {
            let v = self.next_json().await;
            if v["op"] == op {
                return (v, skipped);
            }
            skipped.push(v);
        }
    }

    /// Reads up to `queue-empty` and returns the envelopes pushed before it.
    pub async fn drain_queue(&mut self) -> Vec<Value> {
        let (_, before) = self.until_op("queue-empty").await;
        before
            .into_iter()
            .filter(|v| v["op"] == "message")
            .map(|v| v["envelope"].clone())
            .collect()
    }

    pub async fn ack(&mut self, guid: &str) {
        self.send_json(&json!({"op": "ack", "guid": guid})).await;
    }

    /// Sends a `send` frame and returns the matching `response` (other
    /// frames that arrive meanwhile are returned too).
    pub async fn send_and_wait(&mut self, id: u64, dest: &str, body: Value) -> (Value, Vec<Value>) {
        let mut frame = body;
        frame["op"] = json!("send");
        frame["id"] = json!(id);
        frame["destination"] = json!(dest);
        self.send_json(&frame).await;
        let mut others = Vec::new();
        loop {
            let v = self.next_json().await;
            if v["op"] == "response" && v["id"] == json!(id) {
                return (v, others);
            }
            others.push(v);
        }
    }

    /// Waits for the server to close the socket; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.next_within(Duration::from_secs(10)).await {
                Some(Frame::Closed(code)) => return code,
                Some(Frame::Json(_)) => continue,
                None => panic!("socket was not closed"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
pub fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
