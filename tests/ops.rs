//! Operations: SIGTERM drain, systemd readiness, rate limits, retention,
//! mailbox cap, metrics and log hygiene — against the real binary or a real
//! in-process server.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::process::CourierProcess;
use common::*;
use courier::limits::Limit;
use diesel::connection::SimpleConnection;
use diesel::Connection;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Acks wait 30 s here, so a pushed copy stays unacknowledged.
const SLOW_ACKS: [(&str, &str); 1] = [("COURIER_ACK_TIMEOUT_MS", "30000")];

/// A courier process (acks as [`SLOW_ACKS`]), two devices, and bob
/// connected past his empty mailbox.
struct Pair {
    db: Database,
    server: CourierProcess,
    alice: TestDevice,
    bob: TestDevice,
    bob_ws: Ws,
}

async fn pair_on_a_process(backend: Backend) -> Pair {
    let db = Database::fresh(backend);
    let server = CourierProcess::start(&db.url(), &SLOW_ACKS);
    let base = server.url("");
    let alice = TestDevice::register_at(&base).await;
    let bob = TestDevice::register_at(&base).await;
    let mut bob_ws = bob.connect().await;
    assert!(bob_ws.drain_queue().await.is_empty());
    Pair {
        db,
        server,
        alice,
        bob,
        bob_ws,
    }
}

/// SIGTERM while a device holds an unacknowledged live copy: the socket is
/// closed with 1001, the sender is answered `queued`, the process exits 0,
/// and after a restart the device gets the copy from its mailbox.
async fn sigterm_drains_live_copies_to_the_mailbox(backend: Backend) {
    let Pair {
        db,
        server: mut first,
        alice,
        bob,
        mut bob_ws,
    } = pair_on_a_process(backend).await;

    let sender = alice.clone();
    let bob_uuid = bob.uuid.clone();
    let target = bob.target();
    let answer = tokio::spawn(async move { sender.send(&bob_uuid, &[target], b"in flight").await });
    let pushed = bob_ws.until_op("message").await.0;
    let guid = pushed["envelope"]["guid"].as_str().unwrap().to_owned();

    first.signal("TERM");
    assert_eq!(bob_ws.closed().await, Some(1001));
    let (status, body) = answer.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["status"], "queued");
    assert_eq!(first.wait_exit(Duration::from_secs(15)), Some(0));
    drop(first);

    let second = CourierProcess::start(&db.url(), &SLOW_ACKS);
    let bob = TestDevice {
        base: second.url(""),
        ..bob
    };
    let mut ws = bob.connect().await;
    let queued = ws.drain_queue().await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0]["guid"], guid.as_str());
    assert_eq!(queued[0]["content"], b64(b"in flight"));
}

/// SIGTERM while a WebSocket send waits for its copy's outcome (the device
/// has not acked it): the copy is spilled, and the sender's socket gets the
/// send's answer, `queued`, before its close frame (1001). Closed at once,
/// the socket dropped the answer, and a client would send again.
async fn sigterm_answers_websocket_sends_before_1001(backend: Backend) {
    let Pair {
        db: _db,
        mut server,
        alice,
        bob,
        mut bob_ws,
    } = pair_on_a_process(backend).await;
    let mut alice_ws = alice.connect().await;
    assert!(alice_ws.drain_queue().await.is_empty());

    let mut frame = send_body(&[bob.target()], b"in flight", false);
    frame["op"] = json!("send");
    frame["id"] = json!(7);
    frame["destination"] = json!(bob.uuid);
    alice_ws.send_json(&frame).await;
    bob_ws.until_op("message").await;

    server.signal("TERM");
    let (answer, _) = alice_ws.until_op("response").await;
    assert_eq!(answer["id"], 7, "{answer}");
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["body"]["results"][0]["status"], "queued", "{answer}");
    assert_eq!(alice_ws.closed().await, Some(1001));
    assert_eq!(bob_ws.closed().await, Some(1001));
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
}

/// SIGTERM closes an unidentified (sealed-sender) WebSocket with 1001 as
/// well, beside a device's, and the process exits 0. No actor tracks such a
/// session, and it used to be dropped without a close frame when the
/// server stopped.
async fn sigterm_closes_unidentified_sockets_with_1001(backend: Backend) {
    let db = Database::fresh(backend);
    let mut server = CourierProcess::start(&db.url(), &[]);
    let base = server.url("");
    let bob = TestDevice::register_at(&base).await;
    let mut bob_ws = bob.connect().await;
    assert!(bob_ws.drain_queue().await.is_empty());
    let mut sealed = Ws::unidentified(&base).await;
    // The session is up (and listed) once it answers a frame.
    sealed.send_text("not json").await;
    assert_eq!(sealed.until_op("error").await.0["op"], "error");

    server.signal("TERM");
    assert_eq!(sealed.closed().await, Some(1001));
    assert_eq!(bob_ws.closed().await, Some(1001));
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
}

/// READY=1 arrives on NOTIFY_SOCKET once the port accepts connections;
/// STOPPING=1 on SIGTERM.
async fn systemd_notify_ready_then_stopping(backend: Backend) {
    let db = Database::fresh(backend);
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut p = CourierProcess::start(&db.url(), &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    // READY is only sent after the socket is bound and migrations ran.
    std::net::TcpStream::connect(p.addr).expect("port accepts connections once READY");
    p.signal("TERM");
    let n = sock.recv(&mut buf).expect("a stopping notification");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("STOPPING=1"), "{msg}");
    assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0));
}

/// The N+1st registration from one IP is 429 with Retry-After and the SPEC
/// body; the bundle-fetch limit of one account does not touch another.
async fn rate_limits_are_per_key(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits = true;
        c.limits[Limit::RegisterPerIp] = "3/h".parse().unwrap();
        c.limits[Limit::BundleFetchPerPair] = "2/h".parse().unwrap();
    })
    .await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let carol = TestDevice::register(&server).await;
    let res = http()
        .post(server.url("/v1/accounts"))
        .json(&json!({"password": "0123456789abcdefgh", "registrationId": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert!(body["retryAfter"].as_u64().unwrap() >= 1);

    assert_eq!(bob.upload_vector(0).await, StatusCode::NO_CONTENT);
    let path = format!("/v1/keys/{}/1", bob.uuid);
    for _ in 0..2 {
        assert_eq!(
            alice.request(Method::GET, &path, None).await.0,
            StatusCode::OK
        );
    }
    let (status, body) = alice.request(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    // Another account fetching the same target is not affected.
    assert_eq!(
        carol.request(Method::GET, &path, None).await.0,
        StatusCode::OK
    );
}

/// With retention passed, a sweep deletes the copy and counts it; expired
/// provisioning codes go too.
async fn retention_sweep_deletes_old_copies(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.sweep_interval_secs = 1).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let (status, _) = alice.send(&bob.uuid, &[bob.target()], b"old").await;
    assert_eq!(status, StatusCode::OK);
    let (_, fresh) = alice.send(&bob.uuid, &[bob.target()], b"new").await;
    // Age the first copy past the 30-day retention, directly in the database.
    age_all_but(&server, fresh["results"][0]["guid"].as_str().unwrap());
    let mut left = Value::Null;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = bob.request(Method::GET, "/v1/messages", None).await.1;
        if left["messages"].as_array().unwrap().len() == 1 {
            break;
        }
    }
    let messages = left["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{left}");
    assert_eq!(messages[0]["content"], b64(b"new"));
    let metrics = http()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&metrics, "courier_messages_expired_total"),
        Some(1.0)
    );
}

fn age_all_but(server: &TestServer, keep_guid: &str) {
    let sql = format!("UPDATE mailbox SET server_timestamp = 0 WHERE guid <> '{keep_guid}'");
    match server.db.as_ref().unwrap() {
        Database::Sqlite { path, .. } => {
            let mut c = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
            c.batch_execute("PRAGMA busy_timeout = 5000;").unwrap();
            c.batch_execute(&sql).unwrap();
        }
        Database::Postgres { url, .. } => {
            let mut c = diesel::PgConnection::establish(url).unwrap();
            c.batch_execute(&sql).unwrap();
        }
    }
}

/// A full mailbox answers 507, and nothing is silently dropped.
async fn mailbox_cap_answers_507(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.mailbox_max_messages = 2).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    for _ in 0..2 {
        assert_eq!(
            alice.send(&bob.uuid, &[bob.target()], b"x").await.0,
            StatusCode::OK
        );
    }
    let (status, body) = alice.send(&bob.uuid, &[bob.target()], b"x").await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(body["error"], "mailbox_full");
    let (_, listed) = bob.request(Method::GET, "/v1/messages", None).await;
    assert_eq!(listed["messages"].as_array().unwrap().len(), 2);
    let metrics = http()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&metrics, "courier_mailbox_depth"), Some(2.0));
    // An acknowledgement makes room again: the cap follows the mailbox.
    let guid = listed["messages"][0]["guid"].as_str().unwrap();
    let (status, _) = bob
        .request(Method::DELETE, &format!("/v1/messages/{guid}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        alice.send(&bob.uuid, &[bob.target()], b"x").await.0,
        StatusCode::OK
    );
    assert_eq!(
        alice.send(&bob.uuid, &[bob.target()], b"x").await.0,
        StatusCode::INSUFFICIENT_STORAGE
    );
}

/// The cap holds under concurrency: it is enforced where copies are
/// committed, not only checked before routing.
async fn mailbox_cap_holds_under_concurrent_sends(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.mailbox_max_messages = 10).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let sends = (0..40).map(|i| {
        let alice = alice.clone();
        let (uuid, target) = (bob.uuid.clone(), bob.target());
        tokio::spawn(async move {
            alice
                .send(&uuid, &[target], format!("{i}").as_bytes())
                .await
        })
    });
    let mut ok = 0;
    let mut full = 0;
    for s in sends {
        match s.await.unwrap() {
            (StatusCode::OK, body) => {
                assert_eq!(body["results"][0]["status"], "queued");
                ok += 1
            }
            (StatusCode::INSUFFICIENT_STORAGE, body) => {
                assert_eq!(body["error"], "mailbox_full");
                full += 1
            }
            (s, b) => panic!("unexpected {s}: {b}"),
        }
    }
    assert_eq!((ok, full), (10, 30));
    let (_, listed) = bob.request(Method::GET, "/v1/messages", None).await;
    assert_eq!(listed["messages"].as_array().unwrap().len(), 10);
}

/// `/metrics` is Prometheus text and its counters follow traffic; routes are
/// templates, never raw paths with account ids.
async fn metrics_follow_traffic(backend: Backend) {
    let server = TestServer::start(backend).await;
    let scrape = || async {
        http()
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let before = scrape().await;
    assert_valid_exposition(&before);
    let accepted_before = metric(&before, "courier_messages_accepted_total").unwrap_or(0.0);
    alice.send(&bob.uuid, &[bob.target()], b"hello").await;
    let mut ws = bob.connect().await;
    let envs = ws.drain_queue().await;
    ws.ack(envs[0]["guid"].as_str().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = scrape().await;
    assert_valid_exposition(&after);
    assert_eq!(
        metric(&after, "courier_messages_accepted_total"),
        Some(accepted_before + 1.0)
    );
    assert_eq!(metric(&after, "courier_messages_spilled_total"), Some(1.0));
    assert_eq!(
        metric(&after, "courier_messages_acknowledged_total"),
        Some(1.0)
    );
    assert_eq!(metric(&after, "courier_connected_devices"), Some(1.0));
    assert!(after.contains("route=\"/v1/messages/{uuid}\""));
    assert!(
        !after.contains(&bob.uuid),
        "metrics must not carry account ids"
    );
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn assert_valid_exposition(text: &str) {
    for line in text.lines().filter(|l| !l.is_empty()) {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
    }
}

/// A session touching every endpoint, logged at debug level, never puts a
/// password, an Authorization header, message content or key material in
/// the log.
async fn logs_never_contain_secrets(backend: Backend) {
    let db = Database::fresh(backend);
    let storage_key = b64(&[0x5a; 32]);
    let p = CourierProcess::start(
        &db.url(),
        &[
            ("RUST_LOG", "debug"),
            ("COURIER_ACK_TIMEOUT_MS", "200"),
            ("COURIER_STORAGE_KEY", &storage_key),
        ],
    );
    let base = p.url("");
    let alice = TestDevice::register_at(&base).await;
    let bob = TestDevice::register_at(&base).await;
    let linked = bob.link().await;
    let vectors = vectors();
    let keys = vectors["valid"][1].clone();
    assert_eq!(
        bob.request(Method::PUT, "/v1/keys", Some(&keys)).await.0,
        StatusCode::NO_CONTENT
    );
    alice.request(Method::GET, "/v1/keys/count", None).await;
    alice
        .request(Method::GET, &format!("/v1/keys/{}/*", bob.uuid), None)
        .await;
    let secret_content = b"TOP-SECRET-CIPHERTEXT-0123456789";
    alice
        .send(&bob.uuid, &[bob.target(), linked.target()], secret_content)
        .await;
    let (_, listed) = bob.request(Method::GET, "/v1/messages", None).await;
    let guid = listed["messages"][0]["guid"].as_str().unwrap().to_owned();
    bob.request(Method::DELETE, &format!("/v1/messages/{guid}"), None)
        .await;
    bob.request(Method::GET, "/v1/devices", None).await;
    // Sealed sender: an access key, a sealed send, a sender certificate.
    let access_key = b64(b"log-access-key16");
    bob.request(
        Method::PUT,
        "/v1/accounts/attributes",
        Some(&json!({"unidentifiedAccessKey": access_key})),
    )
    .await;
    let mut sealed = send_body(&[bob.target(), linked.target()], secret_content, false);
    sealed["messages"][0]["type"] = json!(6);
    sealed["messages"][1]["type"] = json!(6);
    let res = http()
        .put(format!("{base}/v1/messages/{}", bob.uuid))
        .header("Unidentified-Access-Key", &access_key)
        .json(&sealed)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let (_, certificate) = bob
        .request(Method::GET, "/v1/certificate/delivery", None)
        .await;
    let certificate = certificate["certificate"].as_str().unwrap().to_owned();
    // WebSocket with the password in the query string.
    let ws_url = format!(
        "{}/v1/websocket?login={}&password={}",
        base.replace("http://", "ws://"),
        linked.login(),
        linked.password
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
    let _ = ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"op":"send","id":1,"destination":alice.uuid,"timestamp":1,
               "messages":[{"destinationDeviceId":1,"destinationRegistrationId":alice.registration_id,
                            "type":1,"content":b64(secret_content)}]}).to_string(),
    )).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
    drop(ws);
    bob.request(
        Method::DELETE,
        &format!("/v1/devices/{}", linked.device_id),
        None,
    )
    .await;
    alice.request(Method::DELETE, "/v1/accounts/me", None).await;
    // Wrong password too.
    let wrong = TestDevice {
        password: "wrong-password-0000".into(),
        ..bob.clone()
    };
    wrong.request(Method::GET, "/v1/devices", None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = p.log_text();
    assert!(log.contains("/v1/messages"), "the access log is on: {log}");
    let forbidden = [
        alice.password.clone(),
        bob.password.clone(),
        linked.password.clone(),
        "wrong-password-0000".to_owned(),
        b64(secret_content),
        String::from_utf8_lossy(secret_content).to_string(),
        keys["identityKey"].as_str().unwrap().to_owned(),
        keys["signedPreKey"]["publicKey"]
            .as_str()
            .unwrap()
            .to_owned(),
        keys["signedPreKey"]["signature"]
            .as_str()
            .unwrap()
            .to_owned(),
        keys["preKeys"][0]["publicKey"].as_str().unwrap().to_owned(),
        "Basic ".to_owned(),
        "password=".to_owned(),
        storage_key,
        access_key,
        certificate,
    ];
    // Nor the private keys of the certificate set.
    let private: Vec<String> = ["server.key", "trust-root.key"]
        .iter()
        .map(|f| std::fs::read_to_string(certificates_dir().join(f)).unwrap())
        .map(|text| text.trim().to_owned())
        .collect();
    let forbidden = forbidden.into_iter().chain(private);
    for needle in forbidden {
        assert!(!log.contains(&needle), "log contains {needle:?}:\n{log}");
    }
}

/// `courier config` prints the effective configuration with secrets masked;
/// `dist/courier.toml` documents exactly the defaults.
#[test]
fn config_command_masks_secrets_and_dist_file_is_the_defaults() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("config")
        .env("COURIER_REGISTRATION_TOKEN", "super-secret-token")
        .env(
            "COURIER_DATABASE_URL",
            "postgres://courier:hunter2@db/courier",
        )
        .env("COURIER_REDIS_URL", "redis://:hunter3@redis:6379/0")
        // base64 of 32 bytes ("storage-key-secret-0123456789abc").
        .env(
            "COURIER_STORAGE_KEY",
            "c3RvcmFnZS1rZXktc2VjcmV0LTAxMjM0NTY3ODlhYmM=",
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains("super-secret-token")
            && !text.contains("hunter2")
            && !text.contains("hunter3")
            && !text.contains("c3RvcmFnZS1rZXktc2VjcmV0"),
        "{text}"
    );
    assert!(text.contains("storage_key = \"********\""), "{text}");
    assert!(text.contains("registration_token = \"********\""), "{text}");

    let dist = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/courier.toml");
    let from_file = courier::Config::load(Some(std::path::Path::new(dist)), Vec::new()).unwrap();
    let defaults = courier::Config::default();
    assert_eq!(
        toml::to_string(&from_file).unwrap(),
        toml::to_string(&defaults).unwrap(),
        "dist/courier.toml must show the defaults"
    );
}

/// `courier migrate` applies the migrations once and is a no-op after.
#[test]
fn migrate_command_applies_pending_migrations_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .arg("migrate")
            .env("COURIER_DATABASE_URL", &db)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert!(
        first.starts_with("applied ") && !first.starts_with("applied 0"),
        "{first}"
    );
    assert_eq!(run().trim(), "applied 0 migrations");
}

/// A bad configuration stops the server with EX_CONFIG and a clear message.
#[test]
fn bad_configuration_exits_78() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("serve")
        .env("COURIER_ACK_TIMEOUT_MS", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("COURIER_ACK_TIMEOUT_MS"));
}

/// Values outside a key's range stop `courier serve` at start with EX_CONFIG
/// and a message naming the key, instead of starting a server that panics
/// later (an ack timeout near `u64::MAX` overflowed `Instant` on the first
/// push). From the environment and from the TOML file alike.
#[test]
fn absurd_configuration_values_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never.db");
    let toml = dir.path().join("courier.toml");
    std::fs::write(&toml, "ack_timeout_ms = 9223372036854775807\n").unwrap();
    let cases: [(&str, &str, &str); 6] = [
        (
            "COURIER_ACK_TIMEOUT_MS",
            "18446744073709551615",
            "ack_timeout_ms",
        ),
        (
            "COURIER_DEVICE_CACHE_TTL_MS",
            "18446744073709551615",
            "device_cache_ttl_ms",
        ),
        (
            "COURIER_DRAIN_TIMEOUT_MS",
            "18446744073709551615",
            "drain_timeout_ms",
        ),
        (
            "COURIER_MESSAGE_RETENTION_DAYS",
            "9999999",
            "message_retention_days",
        ),
        ("COURIER_DB_POOL_SIZE", "4000000000", "db_pool_size"),
        ("COURIER_CONFIG", toml.to_str().unwrap(), "ack_timeout_ms"),
    ];
    for (var, value, key) in cases {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .arg("serve")
            .env_clear()
            .env("COURIER_BIND", "127.0.0.1:0")
            .env("COURIER_DATABASE_URL", &db)
            .env(var, value)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{var}={value}: courier started instead of refusing the value");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(78), "{var}={value}: {stderr}");
        assert!(stderr.contains(key), "{var}={value}: {stderr}");
    }
    assert!(!db.exists(), "a refused configuration opened the database");
}

#[test]
fn version_flag_prints_the_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

backends!(
    sigterm_drains_live_copies_to_the_mailbox,
    sigterm_answers_websocket_sends_before_1001,
    sigterm_closes_unidentified_sockets_with_1001,
    systemd_notify_ready_then_stopping,
    rate_limits_are_per_key,
    retention_sweep_deletes_old_copies,
    mailbox_cap_answers_507,
    mailbox_cap_holds_under_concurrent_sends,
    metrics_follow_traffic,
    logs_never_contain_secrets,
);
