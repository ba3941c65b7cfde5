//! `PUT /v1/messages/multi_recipient` (SPEC "Sealed sender"): a Sealed
//! Sender v2 body built to libsignal's format for two accounts and three
//! devices, the per-account refusals, and hostile bodies. (That the parser
//! reads libsignal's own bodies byte for byte is `domain::sealed_v2`'s test
//! against `tests/data/sealed-sender-v2.json`.)

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::*;

const KEY_A: [u8; 16] = [0x11; 16];
const KEY_B: [u8; 16] = [0x2c; 16];
const E_PUB: [u8; 32] = [0xe5; 32];
const CIPHERTEXT: &[u8] = b"one shared AES-GCM-SIV ciphertext plus its 16-byte tag";

/// One recipient of a body: account, `(device, registration id)`s, and its
/// key material (`C || AT`).
struct To<'a> {
    uuid: &'a str,
    devices: Vec<(u32, i64)>,
    material: [u8; 48],
}

/// A SentMessage as libsignal 0.103 writes it (version 0x23, ServiceIds).
fn body(recipients: &[To<'_>]) -> Vec<u8> {
    let mut out = vec![0x23, recipients.len() as u8];
    for r in recipients {
        out.push(0x00); // ACI
        out.extend_from_slice(uuid::Uuid::parse_str(r.uuid).unwrap().as_bytes());
        for (i, (device, registration)) in r.devices.iter().enumerate() {
            out.push(*device as u8);
            let more = if i + 1 < r.devices.len() { 0x8000 } else { 0 };
            out.extend_from_slice(&(*registration as u16 | more).to_be_bytes());
        }
        out.extend_from_slice(&r.material);
    }
    out.extend_from_slice(&E_PUB);
    out.extend_from_slice(CIPHERTEXT);
    out
}

/// What libsignal's `messageForRecipient` gives for key material `material`.
fn received(material: &[u8; 48]) -> Vec<u8> {
    [&[0x22][..], material, &E_PUB, CIPHERTEXT].concat()
}

async fn put(
    base: &str,
    key: Option<[u8; 16]>,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = http()
        .put(format!(
            "{base}/v1/messages/multi_recipient?ts=1700000000000&online=false"
        ))
        .header("Content-Type", content_type)
        .body(body);
    if let Some(key) = key {
        req = req.header("Unidentified-Access-Key", b64(&key));
    }
    let res = req.send().await.expect("request");
    let status = res.status();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

const MRM: &str = "application/vnd.signal-messenger.mrm";

fn xor(a: [u8; 16], b: [u8; 16]) -> [u8; 16] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

async fn set_key(device: &TestDevice, key: [u8; 16]) {
    let body = json!({"unidentifiedAccessKey": b64(&key), "unrestrictedUnidentifiedAccess": false});
    let (status, _) = device
        .request(Method::PUT, "/v1/accounts/attributes", Some(&body))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// Two accounts: `a` with devices 1 and 2, `b` with device 1, keys set.
async fn accounts(server: &TestServer) -> (TestDevice, TestDevice, TestDevice) {
    let a1 = TestDevice::register(server).await;
    let a2 = a1.link().await;
    let b1 = TestDevice::register(server).await;
    set_key(&a1, KEY_A).await;
    set_key(&b1, KEY_B).await;
    (a1, a2, b1)
}

fn to<'a>(uuid: &'a str, devices: &[&TestDevice], fill: u8) -> To<'a> {
    To {
        uuid,
        devices: devices.iter().map(|d| d.target()).collect(),
        material: [fill; 48],
    }
}

async fn every_device_gets_its_accounts_received_message(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (a1, a2, b1) = accounts(&server).await;
    let mut live = connect_empty(&a1).await;
    let message = body(&[to(&a1.uuid, &[&a1, &a2], 0xa0), to(&b1.uuid, &[&b1], 0xb0)]);
    let send = tokio::spawn({
        let base = server.url("");
        async move { put(&base, Some(xor(KEY_A, KEY_B)), MRM, message).await }
    });
    let (pushed, _) = live.until_op("message").await;
    let envelope = &pushed["envelope"];
    assert_eq!(envelope["type"], 6);
    assert!(envelope.get("source").is_none(), "{envelope}");
    assert_eq!(envelope["timestamp"], 1_700_000_000_000i64);
    assert_eq!(content_of(envelope), received(&[0xa0; 48]));
    live.ack(envelope["guid"].as_str().unwrap()).await;
    let (status, answer) = send.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({"uuids404": []}));

    // The answer came after the offline devices' copies were stored.
    for (device, fill) in [(&a2, 0xa0), (&b1, 0xb0)] {
        let stored = mailbox(device).await;
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored[0]["type"], 6);
        assert!(stored[0].get("source").is_none());
        assert_eq!(content_of(&stored[0]), received(&[fill; 48]));
    }
}

async fn a_stale_device_set_refuses_every_account(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (a1, a2, b1) = accounts(&server).await;
    let b2 = b1.link().await;
    let key = Some(xor(KEY_A, KEY_B));
    let base = server.url("");

    // b2 is missing: 409 naming b's account only, and nothing delivered.
    let message = body(&[to(&a1.uuid, &[&a1, &a2], 1), to(&b1.uuid, &[&b1], 2)]);
    let (status, refusal) = put(&base, key, MRM, message).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refusal}");
    assert_eq!(
        refusal,
        json!([{"uuid": b1.uuid, "devices": {"missingDevices": [b2.device_id], "extraDevices": []}}])
    );
    // A re-registered device (its registration id changed): 410.
    let mut stale = to(&b1.uuid, &[&b1, &b2], 2);
    stale.devices[1].1 = b2.registration_id % 16000 + 1;
    let (status, refusal) = put(
        &base,
        key,
        MRM,
        body(&[to(&a1.uuid, &[&a1, &a2], 1), stale]),
    )
    .await;
    assert_eq!(status, StatusCode::GONE, "{refusal}");
    assert_eq!(
        refusal,
        json!([{"uuid": b1.uuid, "devices": {"staleDevices": [b2.device_id]}}])
    );
    for device in [&a1, &a2, &b1, &b2] {
        assert!(mailbox(device).await.is_empty());
    }
}

async fn the_key_must_be_the_xor_of_the_recipients_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (a1, a2, b1) = accounts(&server).await;
    let base = server.url("");
    let message = || body(&[to(&a1.uuid, &[&a1, &a2], 1), to(&b1.uuid, &[&b1], 2)]);
    for key in [Some(KEY_A), Some(KEY_B), Some([0; 16]), None] {
        let (status, _) = put(&base, key, MRM, message()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}");
    }
    // An unknown recipient: 404, whatever the key.
    let unknown = uuid::Uuid::new_v4().to_string();
    let with_unknown = body(&[
        to(&a1.uuid, &[&a1, &a2], 1),
        To {
            uuid: &unknown,
            devices: vec![(1, 5)],
            material: [3; 48],
        },
    ]);
    let (status, _) = put(&base, Some(KEY_A), MRM, with_unknown).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for device in [&a1, &a2, &b1] {
        assert!(mailbox(device).await.is_empty());
    }
}

async fn hostile_bodies_are_400(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (a1, a2, b1) = accounts(&server).await;
    let base = server.url("");
    let key = Some(xor(KEY_A, KEY_B));
    let good = body(&[to(&a1.uuid, &[&a1, &a2], 1), to(&b1.uuid, &[&b1], 2)]);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("unknown version", [&[0x21][..], &good[1..]].concat()),
        // A count far beyond what follows (and beyond 1,000).
        (
            "huge count",
            [&[0x23, 0xff, 0xff, 0xff, 0xff, 0x0f][..], &good[2..]].concat(),
        ),
        (
            "repeated recipient, other key material",
            body(&[to(&a1.uuid, &[&a1], 1), to(&a1.uuid, &[&a2], 2)]),
        ),
        (
            "a device repeated across entries",
            body(&[to(&a1.uuid, &[&a1], 1), to(&a1.uuid, &[&a1, &a2], 1)]),
        ),
        ("repeated device", body(&[to(&a1.uuid, &[&a1, &a1], 1)])),
        (
            "no ciphertext",
            good[..good.len() - CIPHERTEXT.len()].to_vec(),
        ),
    ];
    for cut in [1, 2, 10, 19, 20, 70, 120] {
        cases.push(("truncated", good[..cut].to_vec()));
    }
    for (what, bad) in cases {
        let (status, answer) = put(&base, key, MRM, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
        assert_eq!(answer["error"], "bad_request", "{what}");
    }
    // The wrong content type.
    let (status, _) = put(&base, key, "application/octet-stream", good.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A bad query and an oversize body get the error body too.
    let res = http()
        .put(format!(
            "{base}/v1/messages/multi_recipient?ts=9223372036854775808"
        ))
        .header("Content-Type", MRM)
        .header("Unidentified-Access-Key", b64(&xor(KEY_A, KEY_B)))
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "bad_request");
    let (status, answer) = put(&base, key, MRM, vec![0x23; 8 * 1024 * 1024 + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["error"], "too_large");
    // Nothing was delivered, and the server still serves the good body.
    for device in [&a1, &a2, &b1] {
        assert!(mailbox(device).await.is_empty());
    }
    let (status, answer) = put(&base, key, MRM, good).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // An account listed twice with the same key material, as libsignal
    // writes it when its devices are not listed together: merged.
    let interleaved = body(&[
        to(&a1.uuid, &[&a1], 1),
        to(&b1.uuid, &[&b1], 2),
        to(&a1.uuid, &[&a2], 1),
    ]);
    let (status, answer) = put(&base, key, MRM, interleaved).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(mailbox(&a2).await.len(), 2);
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// A count from the server's database, by `query` (`… AS n`).
async fn count(server: &TestServer, query: &str) -> i64 {
    use courier::store::{self, Conn};
    use diesel::RunQueryDsl;
    let url = server.db.as_ref().expect("database").url();
    let query = query.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = store::Manager::new(store::Backend::from_url(&url).unwrap())
            .connect()
            .unwrap();
        let rows: Vec<Count> = match &mut conn {
            Conn::Pg(c) => diesel::sql_query(&query).load(c).unwrap(),
            Conn::Sqlite(c) => diesel::sql_query(&query).load(c).unwrap(),
        };
        rows[0].n
    })
    .await
    .unwrap()
}

/// The sweeper's step for shared payloads, as if run at `now_ms`.
async fn sweep_shared(server: &TestServer, now_ms: i64) -> usize {
    use courier::store;
    let url = server.db.as_ref().expect("database").url();
    tokio::task::spawn_blocking(move || {
        let mut conn = store::Manager::new(store::Backend::from_url(&url).unwrap())
            .connect()
            .unwrap();
        store::mailbox::delete_orphaned_shared(&mut conn, now_ms).unwrap()
    })
    .await
    .unwrap()
}

/// The shared part of a multi-recipient message is stored once, sealed like
/// the rows when a storage key is set, read back whole by every device, and
/// swept only once no row names it.
async fn the_shared_payload_is_stored_once(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.storage_key = Some(b64(&[9; 32]));
    })
    .await;
    let (a1, a2, b1) = accounts(&server).await;
    let message = body(&[to(&a1.uuid, &[&a1, &a2], 0xa0), to(&b1.uuid, &[&b1], 0xb0)]);
    let (status, answer) = put(&server.url(""), Some(xor(KEY_A, KEY_B)), MRM, message).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    assert_eq!(
        count(
            &server,
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM mailbox_shared"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &server,
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM mailbox WHERE shared_id IS NOT NULL"
        )
        .await,
        3
    );
    // Each row holds only its sealed prefix: 49 bytes, plus the seal's
    // nonce, tag and header, far less than the shared ciphertext.
    let longest = "SELECT CAST(MAX(LENGTH(content)) AS BIGINT) AS n FROM mailbox";
    assert!(count(&server, longest).await < 49 + 100);
    let shared = "SELECT CAST(MAX(LENGTH(content)) AS BIGINT) AS n FROM mailbox_shared";
    assert!(count(&server, shared).await >= (E_PUB.len() + CIPHERTEXT.len()) as i64);

    // Not swept while a copy names it, however late.
    let later = i64::MAX / 2;
    assert_eq!(sweep_shared(&server, later).await, 0);
    for (device, fill) in [(&a1, 0xa0), (&a2, 0xa0), (&b1, 0xb0)] {
        let stored = mailbox(device).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(content_of(&stored[0]), received(&[fill; 48]));
        let guid = stored[0]["guid"].as_str().unwrap();
        let (status, _) = device
            .request(Method::DELETE, &format!("/v1/messages/{guid}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        // Still there for the copies not yet acknowledged.
        assert_eq!(
            count(
                &server,
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM mailbox_shared"
            )
            .await,
            1
        );
    }
    // Every copy gone: kept for the grace period, then swept.
    assert_eq!(sweep_shared(&server, now_ms()).await, 0);
    assert_eq!(sweep_shared(&server, later).await, 1);
    assert_eq!(
        count(
            &server,
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM mailbox_shared"
        )
        .await,
        0
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

backends!(
    the_shared_payload_is_stored_once,
    every_device_gets_its_accounts_received_message,
    a_stale_device_set_refuses_every_account,
    the_key_must_be_the_xor_of_the_recipients_keys,
    hostile_bodies_are_400,
);
