//! Web Push (SPEC "Push"): a real push receiver on loopback decrypts each
//! push with the subscription's private key and auth secret (RFC 8291) and
//! checks its VAPID signature (RFC 8292) against `GET /v1/push/vapid-key`.
//! An offline device is pushed once per window; a connected one never; a
//! `410` deletes the subscription; a hanging receiver does not delay a send;
//! unsafe endpoints and bad keys are refused.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Pushed {
    path: String,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Pushed {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A push service on 127.0.0.1: records each request, answers `status`,
/// or never answers while `hang` is set.
#[derive(Clone)]
struct Receiver {
    port: u16,
    requests: Arc<Mutex<Vec<Pushed>>>,
    status: Arc<AtomicU16>,
    hang: Arc<AtomicBool>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            port: listener.local_addr().unwrap().port(),
            requests: Arc::default(),
            status: Arc::new(AtomicU16::new(201)),
            hang: Arc::default(),
        };
        let r = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(r.clone().serve(stream));
            }
        });
        receiver
    }

    /// One HTTP/1.1 request (`Content-Length` body), then close.
    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let path = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("")
            .to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        self.requests.lock().unwrap().push(Pushed {
            path,
            headers,
            body,
        });
        if self.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        let status = self.status.load(Ordering::SeqCst);
        let reply =
            format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        let _ = stream.write_all(reply.as_bytes()).await;
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn take(&self) -> Vec<Pushed> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` requests arrived.
    async fn wait_for(&self, n: usize) -> Vec<Pushed> {
        within(&format!("{n} pushes"), async {
            while self.count() < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        self.take()
    }
}

/// A subscription as a browser makes one: its P-256 key pair and auth secret.
struct Subscriber {
    secret: p256::SecretKey,
    auth: [u8; 16],
    token: String,
}

impl Subscriber {
    fn new() -> Subscriber {
        use rand::RngCore;
        let mut auth = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut auth);
        Subscriber {
            secret: p256::SecretKey::random(&mut rand::thread_rng()),
            auth,
            token: format!("tok-{}", rand::thread_rng().next_u64()),
        }
    }

    fn public(&self) -> Vec<u8> {
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    fn body(&self, endpoint: &str) -> Value {
        json!({
            "endpoint": endpoint,
            "expirationTime": null,
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(self.public()),
                "auth": URL_SAFE_NO_PAD.encode(self.auth),
            },
        })
    }

    /// `PUT /v1/push` as `device`, to `receiver`.
    async fn subscribe(&self, device: &TestDevice, receiver: &Receiver) {
        let endpoint = format!("http://127.0.0.1:{}/push/{}", receiver.port, self.token);
        let (status, body) = device
            .request(Method::PUT, "/v1/push", Some(&self.body(&endpoint)))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }

    /// Decrypts a push (RFC 8291, aes128gcm) with this subscription's keys.
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        let components = ece::EcKeyComponents::new(self.secret.to_bytes().to_vec(), self.public());
        ece::decrypt(&components, &self.auth, body).expect("the push decrypts")
    }
}

async fn insecure_server(backend: Backend, coalesce_secs: u64) -> TestServer {
    TestServer::start_with(backend, |c| {
        c.push_allow_insecure = true;
        c.push_coalesce_secs = coalesce_secs;
    })
    .await
}

async fn vapid_key(server: &TestServer) -> String {
    let (status, body) = call(Method::GET, &server.url("/v1/push/vapid-key"), None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["publicKey"].as_str().expect("publicKey").to_owned()
}

/// Checks everything a push service would: the path, the headers, the
/// VAPID token (signature by `vapid`, audience, expiry), and that the body
/// decrypts to exactly `{"op":"wake"}`.
fn assert_valid_push(push: &Pushed, sub: &Subscriber, vapid: &str, port: u16) {
    assert_eq!(push.path, format!("/push/{}", sub.token));
    assert_eq!(push.header("urgency"), Some("high"));
    assert_eq!(push.header("content-encoding"), Some("aes128gcm"));
    let ttl: u64 = push
        .header("ttl")
        .expect("TTL")
        .parse()
        .expect("TTL is a number");
    assert!(ttl > 0, "TTL {ttl}");
    let authorization = push.header("authorization").expect("Authorization");
    let (token, key) = authorization
        .strip_prefix("vapid t=")
        .and_then(|rest| rest.split_once(", k="))
        .unwrap_or_else(|| panic!("not a VAPID header: {authorization}"));
    assert_eq!(key, vapid, "k= is the key of /v1/push/vapid-key");
    let (input, signature) = token.rsplit_once('.').expect("a JWT");
    let (header, claims) = input.split_once('.').expect("a JWT");
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    let verifying = VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(vapid).unwrap()).unwrap();
    let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap()).unwrap();
    verifying
        .verify(input.as_bytes(), &signature)
        .expect("the VAPID signature verifies against /v1/push/vapid-key");
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!(claims["aud"], format!("http://127.0.0.1:{port}"));
    assert_eq!(claims["sub"], "mailto:admin@localhost");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(exp > now && exp <= now + 24 * 3600, "exp {exp}, now {now}");
    assert_eq!(sub.decrypt(&push.body), br#"{"op":"wake"}"#);
}

/// A send to `dest` (one copy) answered `status` for that device.
async fn send_one(from: &TestDevice, dest: &TestDevice, content: &[u8], status: &str) -> String {
    let (code, body) = from.send(&dest.uuid, &[dest.target()], content).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let r = results(&body);
    assert_eq!(r[&u64::from(dest.device_id)].1, status, "{body}");
    r[&u64::from(dest.device_id)].0.clone()
}

async fn metric(server: &TestServer, name: &str) -> u64 {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("courier_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

async fn offline_device_is_pushed_once_per_window(backend: Backend) {
    let receiver = Receiver::start().await;
    let server = insecure_server(backend, 2).await;
    let vapid = vapid_key(&server).await;
    assert_eq!(vapid_key(&server).await, vapid, "the key is stable");
    assert_eq!(URL_SAFE_NO_PAD.decode(&vapid).unwrap().len(), 65);
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let sub = Subscriber::new();
    sub.subscribe(&b, &receiver).await;

    let content = b"meet me at the usual place";
    let guid = send_one(&a, &b, content, "queued").await;
    let pushes = receiver.wait_for(1).await;
    assert_valid_push(&pushes[0], &sub, &vapid, receiver.port);
    // Nothing about the message, not even encrypted: the body is the size
    // of the padded wake, and carries no sender, guid or content.
    for secret in [a.uuid.as_bytes(), guid.as_bytes(), content.as_slice()] {
        assert!(!pushes[0].body.windows(secret.len()).any(|w| w == secret));
        let plain = sub.decrypt(&pushes[0].body);
        assert!(!plain.windows(secret.len()).any(|w| w == secret));
    }

    // Within the window: stored, not pushed again.
    send_one(&a, &b, b"second", "queued").await;
    send_one(&a, &b, b"third", "queued").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(receiver.count(), 1, "pushed again within the window");
    assert!(metric(&server, "push_coalesced_total").await >= 2);

    // After it, a new copy pushes again.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    send_one(&a, &b, b"fourth", "queued").await;
    let pushes = receiver.wait_for(2).await;
    assert_valid_push(&pushes[1], &sub, &vapid, receiver.port);
    assert_eq!(metric(&server, "push_sent_total").await, 2);

    // Ephemeral sends to an offline device are dropped, never pushed.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let body = send_body(&[b.target()], b"typing", true);
    let (status, body) = a
        .request(
            Method::PUT,
            &format!("/v1/messages/{}", b.uuid),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.count(), 2, "an ephemeral send pushed");
}

async fn connected_device_is_not_pushed(backend: Backend) {
    let receiver = Receiver::start().await;
    let server = insecure_server(backend, 1).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let sub = Subscriber::new();
    sub.subscribe(&b, &receiver).await;
    let mut ws = connect_empty(&b).await;
    let sending = tokio::spawn({
        let (a, b) = (a.clone(), b.clone());
        async move { send_one(&a, &b, b"live", "delivered").await }
    });
    let (frame, _) = ws.until_op("message").await;
    ws.ack(frame["envelope"]["guid"].as_str().unwrap()).await;
    sending.await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(receiver.count(), 0, "a connected device was pushed");

    // Gone again: the next copy pushes.
    ws.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_one(&a, &b, b"later", "queued").await;
    let pushes = receiver.wait_for(1).await;
    assert_eq!(sub.decrypt(&pushes[0].body), br#"{"op":"wake"}"#);
}

/// In a cluster, "connected nowhere" means on no node: a device connected
/// to node 2 is not pushed when a send goes through node 1 (it is
/// delivered live there); once it has left, a send through node 1 wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connected_to_another_node_is_not_pushed() {
    if !common::cluster::cluster_available() {
        return;
    }
    let receiver = Receiver::start().await;
    let c = common::cluster::TestCluster::start(2, |config| {
        config.push_allow_insecure = true;
        config.push_coalesce_secs = 1;
    })
    .await;
    let a = TestDevice::register(&c.nodes[0]).await;
    let b = TestDevice::register(&c.nodes[0]).await;
    let sub = Subscriber::new();
    sub.subscribe(&b, &receiver).await;
    let on_node2 = TestDevice {
        base: c.nodes[1].url(""),
        ..b.clone()
    };
    let mut ws = connect_empty(&on_node2).await;
    let sending = tokio::spawn({
        let (a, b) = (a.clone(), b.clone());
        async move { send_one(&a, &b, b"live", "delivered").await }
    });
    let (frame, _) = ws.until_op("message").await;
    ws.ack(frame["envelope"]["guid"].as_str().unwrap()).await;
    sending.await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        receiver.count(),
        0,
        "a device connected to node 2 was pushed"
    );

    ws.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_one(&a, &b, b"later", "queued").await;
    let pushes = receiver.wait_for(1).await;
    assert_eq!(sub.decrypt(&pushes[0].body), br#"{"op":"wake"}"#);
}

async fn gone_subscription_is_deleted(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.status.store(410, Ordering::SeqCst);
    let server = insecure_server(backend, 1).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    Subscriber::new().subscribe(&b, &receiver).await;
    send_one(&a, &b, b"one", "queued").await;
    receiver.wait_for(1).await;
    within("the subscription is dropped", async {
        while metric(&server, "push_subscriptions_dropped_total").await < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Past the window: no subscription, so nothing is pushed.
    receiver.status.store(201, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    send_one(&a, &b, b"two", "queued").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(receiver.count(), 1, "a deleted subscription was pushed");

    // DELETE /v1/push removes a subscription too.
    let c = TestDevice::register(&server).await;
    Subscriber::new().subscribe(&c, &receiver).await;
    let (status, _) = c.request(Method::DELETE, "/v1/push", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    send_one(&a, &c, b"three", "queued").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(receiver.count(), 1, "an unsubscribed device was pushed");
}

async fn hanging_receiver_does_not_delay_sends(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.hang.store(true, Ordering::SeqCst);
    let server = insecure_server(backend, 1).await;
    let a = TestDevice::register(&server).await;
    let mut devices = Vec::new();
    for _ in 0..3 {
        let d = TestDevice::register(&server).await;
        Subscriber::new().subscribe(&d, &receiver).await;
        devices.push(d);
    }
    for d in &devices {
        send_one(&a, d, b"first", "queued").await;
    }
    receiver.wait_for(3).await;
    // Every push hangs now; sends are answered as fast as ever.
    for d in &devices {
        let started = Instant::now();
        send_one(&a, d, b"while the push service hangs", "queued").await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a send waited {:?} for a hanging push service",
            started.elapsed()
        );
    }
}

async fn unsafe_endpoints_and_bad_keys_are_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let d = TestDevice::register(&server).await;
    let sub = Subscriber::new();
    for endpoint in [
        "http://push.example.com/push/x",
        "https://127.0.0.1/push/x",
        "https://10.0.0.1/push/x",
        "https://192.168.1.20/push/x",
        "https://[::1]/push/x",
        "https://[fd00::1]/push/x",
        "https://169.254.169.254/latest/meta-data",
        "https://localhost/push/x",
        "https://localhost:8443/push/x",
        "ftp://push.example.com/x",
        "not a url",
    ] {
        let (status, body) = d
            .request(Method::PUT, "/v1/push", Some(&sub.body(endpoint)))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{endpoint}: {body}");
        assert_eq!(body["error"], "bad_request", "{body}");
    }
    let long = format!("https://push.example.com/{}", "a".repeat(2_100));
    let (status, _) = d
        .request(Method::PUT, "/v1/push", Some(&sub.body(&long)))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Bad keys, on a server that would take the endpoint.
    let server = insecure_server(backend, 30).await;
    let d = TestDevice::register(&server).await;
    let endpoint = "http://127.0.0.1:9/push/x";
    let good = sub.body(endpoint);
    let (status, body) = d.request(Method::PUT, "/v1/push", Some(&good)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let mut off_curve = sub.public();
    off_curve[64] ^= 1;
    for keys in [
        json!({"p256dh": URL_SAFE_NO_PAD.encode(&off_curve), "auth": URL_SAFE_NO_PAD.encode([1u8; 16])}),
        json!({"p256dh": URL_SAFE_NO_PAD.encode(&sub.public()[..33]), "auth": URL_SAFE_NO_PAD.encode([1u8; 16])}),
        json!({"p256dh": good["keys"]["p256dh"], "auth": URL_SAFE_NO_PAD.encode([1u8; 15])}),
        json!({"p256dh": good["keys"]["p256dh"], "auth": "***"}),
        json!({"p256dh": good["keys"]["p256dh"]}),
    ] {
        let body = json!({"endpoint": endpoint, "keys": keys});
        let (status, answer) = d.request(Method::PUT, "/v1/push", Some(&body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    // No credentials, no subscription.
    let (status, _) = call(Method::PUT, &server.url("/v1/push"), None, Some(&good)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(Method::DELETE, &server.url("/v1/push"), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

backends!(
    offline_device_is_pushed_once_per_window,
    connected_device_is_not_pushed,
    gone_subscription_is_deleted,
    hanging_receiver_does_not_delay_sends,
    unsafe_endpoints_and_bad_keys_are_refused,
);
