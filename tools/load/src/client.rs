//! The client side of the wire contract (SPEC.md), shared by every scenario:
//! account registration over HTTP, authenticated WebSocket connections
//! (optionally from a chosen loopback source address), the frames the tool
//! sends and the parts of server frames it reads, and the timestamped
//! message payload that lets a receiver measure delivery latency.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{FutureExt as _, SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket over a plain loopback TCP stream.
pub type Ws = WebSocketStream<TcpStream>;

/// How long a handshake, a registration or a wait for `queue-empty` may take
/// before it counts as an error.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A registered device (always device 1 of its account here) and its secret.
#[derive(Debug, Clone)]
pub struct Device {
    pub uuid: String,
    pub password: String,
    pub registration_id: u32,
}

impl Device {
    /// A device that exists only in the tool (for the ceiling relay, which
    /// has no accounts).
    pub fn fabricated(index: usize) -> Device {
        Device {
            uuid: uuid::Uuid::new_v4().to_string(),
            password: fresh_password(),
            registration_id: registration_id(index),
        }
    }

    /// `UUID.1`, the login for HTTP Basic and WebSocket authentication.
    pub fn login(&self) -> String {
        format!("{}.1", self.uuid)
    }

    /// The value of an `Authorization: Basic …` header for this device.
    pub fn basic_auth(&self) -> String {
        let token = B64.encode(format!("{}:{}", self.login(), self.password));
        format!("Basic {token}")
    }
}

/// A registration id in the SPEC's range 1..=16380, spread by index.
pub fn registration_id(index: usize) -> u32 {
    (index % 16380) as u32 + 1
}

/// A 16+ character printable secret, unique per call.
pub fn fresh_password() -> String {
    format!("load-{}", uuid::Uuid::new_v4().simple())
}

/// An HTTP client for one logical user: keep-alive, bounded timeouts.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(IO_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .expect("a reqwest client with static settings always builds")
}

#[derive(Deserialize)]
struct Registered {
    uuid: String,
}

/// `POST /v1/accounts`; the device is `UUID.1`.
pub async fn register(http: &reqwest::Client, base: &str, index: usize) -> anyhow::Result<Device> {
    let password = fresh_password();
    let registration_id = registration_id(index);
    let res = http
        .post(format!("{base}/v1/accounts"))
        .json(&serde_json::json!({"password": password, "registrationId": registration_id}))
        .send()
        .await
        .context("POST /v1/accounts")?;
    let status = res.status();
    if status != reqwest::StatusCode::CREATED {
        let body = res.text().await.unwrap_or_default();
        bail!("POST /v1/accounts answered {status}: {body}");
    }
    let body: Registered = res.json().await.context("POST /v1/accounts body")?;
    Ok(Device {
        uuid: body.uuid,
        password,
        registration_id,
    })
}

/// Registers `n` accounts with at most `concurrency` requests in flight.
/// Fails if any registration fails: every scenario needs all its accounts.
pub async fn register_many(
    base: &str,
    n: usize,
    concurrency: usize,
    progress: Option<&AtomicU64>,
) -> anyhow::Result<Vec<Device>> {
    let http = http_client();
    let results: Vec<anyhow::Result<Device>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let http = &http;
            async move {
                let d = register(http, base, i).await;
                if let Some(p) = progress {
                    p.fetch_add(1, Ordering::Relaxed);
                }
                d
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    let mut devices = Vec::with_capacity(n);
    let mut failures = 0usize;
    let mut first = None;
    for r in results {
        match r {
            Ok(d) => devices.push(d),
            Err(e) => {
                failures += 1;
                first.get_or_insert(e);
            }
        }
    }
    match first {
        None => Ok(devices),
        Some(e) => Err(e.context(format!("{failures} of {n} registrations failed"))),
    }
}

/// Opens a WebSocket for each of `devices` and reads each to its
/// `queue-empty`, so they are live before the caller sends.
pub async fn connect_all(addr: SocketAddr, devices: &[Device]) -> anyhow::Result<Vec<Ws>> {
    let mut sockets = Vec::with_capacity(devices.len());
    for d in devices {
        let mut ws = connect(addr, d, None).await?;
        drain_until_queue_empty(&mut ws, IO_TIMEOUT, None).await?;
        sockets.push(ws);
    }
    Ok(sockets)
}

/// Opens `GET /v1/websocket` as `device`, optionally from `source` (any
/// 127.0.0.0/8 address: the loopback interface owns the whole block).
pub async fn connect(
    addr: SocketAddr,
    device: &Device,
    source: Option<IpAddr>,
) -> anyhow::Result<Ws> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("socket")?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    let mut request = format!("ws://{addr}/v1/websocket")
        .into_client_request()
        .context("WebSocket request")?;
    request.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&device.basic_auth()).context("auth header")?,
    );
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .context("WebSocket handshake")?;
    Ok(ws)
}

/// Opens `GET /v1/websocket?login=…&password=…` by hand on a socket whose
/// receive buffer is `rcvbuf` bytes (`SO_RCVBUF`, set before connecting so
/// the window the peer sees is small from the first segment), and reads the
/// answer's head byte by byte, so that nothing after the `101` is consumed:
/// what the server sends next stays in the kernel buffer, which fills at
/// once. For a peer that stops reading.
pub async fn connect_stalled(
    addr: SocketAddr,
    device: &Device,
    rcvbuf: u32,
) -> anyhow::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("socket")?;
    socket.set_recv_buffer_size(rcvbuf).context("SO_RCVBUF")?;
    let mut stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    let key = B64.encode(rand::random::<[u8; 16]>());
    let request = format!(
        "GET /v1/websocket?login={}&password={} HTTP/1.1\r\n\
         Host: {addr}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        percent_encode(&device.login()),
        percent_encode(&device.password),
    );
    stream
        .write_all(request.as_bytes())
        .await
        .context("write the upgrade request")?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 8192 {
            bail!("the upgrade answer's head is over 8 KiB");
        }
        head.push(stream.read_u8().await.context("read the upgrade answer")?);
    }
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("101") {
        bail!("the upgrade was answered {status_line:?}");
    }
    let accept = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-accept")
            .then(|| value.trim().to_owned())
    });
    if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
        bail!("the upgrade answer's Sec-WebSocket-Accept is wrong: {accept:?}");
    }
    Ok(stream)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// How `PUT /v1/messages/{uuid}` was answered.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    /// For a 200: the copy's `status` (`queued`, `delivered`, …).
    pub delivery: Option<String>,
    /// For a 200: the copy's guid.
    pub guid: Option<String>,
    /// For anything else: the body.
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct HttpResults {
    results: Vec<HttpResult>,
}

#[derive(Deserialize)]
struct HttpResult {
    guid: String,
    status: String,
}

/// `PUT /v1/messages/{to}` from `from`: one copy, for device 1 of `to`.
pub async fn send_http(
    http: &reqwest::Client,
    base: &str,
    from: &Device,
    to: &Device,
    content_b64: &str,
) -> anyhow::Result<HttpAnswer> {
    let body = format!(
        concat!(
            r#"{{"timestamp":{},"messages":[{{"destinationDeviceId":1,"#,
            r#""destinationRegistrationId":{},"type":1,"content":"{}"}}]}}"#
        ),
        epoch_ms(),
        to.registration_id,
        content_b64
    );
    let res = http
        .put(format!("{base}/v1/messages/{}", to.uuid))
        .header("Authorization", from.basic_auth())
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .context("PUT /v1/messages")?;
    let status = res.status().as_u16();
    let text = res.text().await.context("PUT /v1/messages: body")?;
    if status != 200 {
        return Ok(HttpAnswer {
            status,
            delivery: None,
            guid: None,
            error: Some(text),
        });
    }
    let first = serde_json::from_str::<HttpResults>(&text)
        .ok()
        .and_then(|r| r.results.into_iter().next());
    Ok(HttpAnswer {
        status,
        delivery: first.as_ref().map(|r| r.status.clone()),
        guid: first.map(|r| r.guid),
        error: None,
    })
}

/// Bytes that `b64` (standard, padded) decodes to, without decoding it.
pub fn decoded_len(b64: &str) -> usize {
    let pad = b64.bytes().rev().take(2).filter(|&b| b == b'=').count();
    (b64.len() / 4 * 3).saturating_sub(pad)
}

/// A server frame, borrowing from the text it was parsed from. Only the
/// fields some scenario reads are declared; the rest is skipped.
#[derive(Deserialize)]
pub struct ServerFrame<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default, borrow)]
    pub body: Option<ResponseBody<'a>>,
    #[serde(default, borrow)]
    pub envelope: Option<Envelope<'a>>,
}

/// The body of a `response` frame; only a 200's send results matter here.
#[derive(Deserialize, Default)]
pub struct ResponseBody<'a> {
    #[serde(default, borrow)]
    pub results: Vec<SendResult<'a>>,
}

#[derive(Deserialize)]
pub struct SendResult<'a> {
    #[serde(borrow)]
    pub status: Cow<'a, str>,
}

#[derive(Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub guid: Cow<'a, str>,
    #[serde(default, borrow)]
    pub content: Cow<'a, str>,
}

impl<'a> ServerFrame<'a> {
    pub fn parse(text: &'a str) -> anyhow::Result<ServerFrame<'a>> {
        serde_json::from_str(text).map_err(|e| anyhow!("server frame is not what SPEC says: {e}"))
    }
}

/// How a `send` was answered, reduced to what the scenarios count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Delivered,
    Queued,
    /// 200 with a status other than delivered/queued (e.g. `dropped`).
    OtherOk,
    /// Any non-200 status.
    Error(u16),
}

impl ServerFrame<'_> {
    /// For a `response` frame: its outcome (the first result's status; the
    /// tool always sends one copy).
    pub fn answer(&self) -> Answer {
        match self.status {
            Some(200) => match self
                .body
                .as_ref()
                .and_then(|b| b.results.first())
                .map(|r| r.status.as_ref())
            {
                Some("delivered") => Answer::Delivered,
                Some("queued") => Answer::Queued,
                _ => Answer::OtherOk,
            },
            Some(s) => Answer::Error(s),
            None => Answer::Error(0),
        }
    }
}

/// A `send` frame carrying one copy for device 1 of `destination`.
pub fn send_frame(id: u64, destination: &Device, timestamp_ms: u64, content_b64: &str) -> String {
    format!(
        concat!(
            r#"{{"op":"send","id":{},"destination":"{}","timestamp":{},"messages":"#,
            r#"[{{"destinationDeviceId":1,"destinationRegistrationId":{},"type":1,"content":"{}"}}]}}"#
        ),
        id, destination.uuid, timestamp_ms, destination.registration_id, content_b64
    )
}

/// An `ack` frame. The guid is re-quoted so that whatever the server sent
/// cannot break the JSON.
pub fn ack_frame(guid: &str) -> String {
    let quoted = serde_json::to_string(guid).unwrap_or_else(|_| "\"\"".into());
    format!(r#"{{"op":"ack","guid":{quoted}}}"#)
}

/// What the tool puts at the start of every ciphertext it sends, so the
/// receiving side can attribute, order and time each delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Which run (sweep step, scenario) sent it: stale copies from an earlier
    /// run that the mailbox hands back are recognised and not miscounted.
    pub run: u32,
    /// Which sender (pair index, sender index).
    pub stream: u32,
    /// Sequence number within that sender's stream.
    pub seq: u64,
    /// Send time in nanoseconds since the run's common start `Instant`.
    pub sent_ns: u64,
}

/// Bytes of a [`Stamp`]; a multiple of 3, so its base64 is exactly
/// [`STAMP_B64_LEN`] characters and can be concatenated with the padding's.
pub const STAMP_LEN: usize = 24;
pub const STAMP_B64_LEN: usize = STAMP_LEN / 3 * 4;

/// Builds `size`-byte contents (at least [`STAMP_LEN`]): the stamp followed by
/// fixed filler whose base64 is computed once.
pub struct PayloadMaker {
    filler_b64: String,
}

impl PayloadMaker {
    pub fn new(size: usize) -> PayloadMaker {
        let filler = vec![0x5a_u8; size.saturating_sub(STAMP_LEN)];
        PayloadMaker {
            filler_b64: B64.encode(filler),
        }
    }

    /// Base64 of stamp ‖ filler.
    pub fn content(&self, stamp: Stamp) -> String {
        let mut head = [0u8; STAMP_LEN];
        head[0..4].copy_from_slice(&stamp.run.to_le_bytes());
        head[4..8].copy_from_slice(&stamp.stream.to_le_bytes());
        head[8..16].copy_from_slice(&stamp.seq.to_le_bytes());
        head[16..24].copy_from_slice(&stamp.sent_ns.to_le_bytes());
        let mut out = String::with_capacity(STAMP_B64_LEN + self.filler_b64.len());
        B64.encode_string(head, &mut out);
        out.push_str(&self.filler_b64);
        out
    }
}

/// Reads the stamp back from a delivered `content` (decoding only its first
/// 32 base64 characters). `None` for content the tool did not write.
pub fn read_stamp(content_b64: &str) -> Option<Stamp> {
    let head = content_b64.get(..STAMP_B64_LEN)?;
    let mut bytes = [0u8; STAMP_LEN];
    let n = B64.decode_slice(head, &mut bytes).ok()?;
    if n != STAMP_LEN {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
    Some(Stamp {
        run: u32_at(0),
        stream: u32_at(4),
        seq: u64_at(8),
        sent_ns: u64_at(16),
    })
}

/// Milliseconds since the Unix epoch (the `timestamp` of a send).
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One envelope pushed to a device: its guid and the stamp in its content.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub guid: String,
    pub stamp: Option<Stamp>,
}

/// Reads frames until `queue-empty`, acknowledging every `message` on the
/// way (acks of frames that arrived together go out in one write), and
/// returns what was pushed before it: the stored mailbox. Bounded by `wait`
/// of silence. `counter`, if given, is bumped per envelope.
pub async fn drain_until_queue_empty(
    ws: &mut Ws,
    wait: Duration,
    counter: Option<&AtomicU64>,
) -> anyhow::Result<Vec<Pushed>> {
    let mut pushed = Vec::new();
    loop {
        let mut next = match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => bail!("no queue-empty within {wait:?} of silence"),
            Ok(n) => n,
        };
        loop {
            let msg = match next {
                None => bail!("connection closed before queue-empty"),
                Some(Err(e)) => bail!("connection failed before queue-empty: {e}"),
                Some(Ok(m)) => m,
            };
            if let Message::Text(text) = &msg {
                let frame = ServerFrame::parse(text)?;
                match frame.op.as_ref() {
                    "queue-empty" => {
                        ws.flush().await.context("flush acks")?;
                        return Ok(pushed);
                    }
                    "message" => {
                        if let Some(env) = frame.envelope {
                            ws.feed(Message::Text(ack_frame(&env.guid)))
                                .await
                                .context("ack")?;
                            if let Some(c) = counter {
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                            pushed.push(Pushed {
                                stamp: read_stamp(&env.content),
                                guid: env.guid.into_owned(),
                            });
                        }
                    }
                    _ => {}
                }
            } else if let Message::Close(c) = msg {
                bail!("server closed before queue-empty: {c:?}");
            }
            match ws.next().now_or_never() {
                Some(n) => next = n,
                None => break,
            }
        }
        ws.flush().await.context("flush acks")?;
    }
}

/// Closes with the WebSocket closing handshake: sends a close frame, then
/// reads (and discards) until the server's close frame or EOF, at most 2 s.
/// Dropping the socket right after sending would leave the server's reply
/// unread, so the kernel answers it with a RST, and a RST makes the
/// server's kernel discard frames it has received but the server has not
/// read yet — acks included.
pub async fn close_quietly(mut ws: Ws) {
    let handshake = async {
        ws.close(None).await.ok()?;
        while let Some(Ok(_)) = ws.next().await {}
        Some(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), handshake).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_through_content() {
        for size in [0, 24, 25, 256, 1000] {
            let maker = PayloadMaker::new(size);
            let stamp = Stamp {
                run: 7,
                stream: 3,
                seq: 123_456_789,
                sent_ns: 42,
            };
            let content = maker.content(stamp);
            let raw = B64.decode(&content).unwrap();
            assert_eq!(raw.len(), size.max(STAMP_LEN));
            assert_eq!(read_stamp(&content), Some(stamp));
        }
        assert_eq!(read_stamp("short"), None);
    }

    #[test]
    fn decoded_length_without_decoding() {
        for n in 0..10 {
            assert_eq!(decoded_len(&B64.encode(vec![1u8; n])), n);
        }
        assert_eq!(percent_encode("a b/c.1~"), "a%20b%2Fc.1~");
    }

    #[test]
    fn frames_are_json() {
        let d = Device::fabricated(5);
        let v: serde_json::Value = serde_json::from_str(&send_frame(9, &d, 1, "AAAA")).unwrap();
        assert_eq!(v["messages"][0]["destinationRegistrationId"], 6);
        assert_eq!(v["destination"], d.uuid.as_str());
        let a: serde_json::Value = serde_json::from_str(&ack_frame("x\"y")).unwrap();
        assert_eq!(a["guid"], "x\"y");
    }

    #[test]
    fn answers_are_classified() {
        let f = ServerFrame::parse(
            r#"{"op":"response","id":1,"status":200,"body":{"results":[{"deviceId":1,"guid":"g","status":"queued"}]}}"#,
        )
        .unwrap();
        assert_eq!(f.answer(), Answer::Queued);
        let f = ServerFrame::parse(
            r#"{"op":"response","id":1,"status":507,"body":{"error":"x","message":"y"}}"#,
        )
        .unwrap();
        assert_eq!(f.answer(), Answer::Error(507));
    }
}
