//! Encryption at rest of the mailbox (`COURIER_STORAGE_KEY`), against real
//! servers and the rows themselves: with a key, no row holds the sender or
//! the content in the clear, devices still get exactly what was sent (HTTP
//! and WebSocket), rows written under the previous key read after a
//! rotation, rows under a dropped key are skipped, and a row moved to
//! another place does not open.

mod common;

use base64::Engine as _;
use common::*;
use courier::domain::at_rest::key_id;
use courier::store::{self, Conn};
use diesel::sql_types::{BigInt, Binary, Integer, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn key(fill: u8) -> [u8; 32] {
    [fill; 32]
}

fn key_b64(fill: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode(key(fill))
}

/// One `mailbox` row, as the database holds it.
#[derive(Debug, QueryableByName)]
struct RawRow {
    #[diesel(sql_type = Text)]
    account: String,
    #[diesel(sql_type = BigInt)]
    device_id: i64,
    #[diesel(sql_type = Text)]
    guid: String,
    #[diesel(sql_type = Nullable<Text>)]
    source: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    source_device: Option<i64>,
    #[diesel(sql_type = Binary)]
    content: Vec<u8>,
    #[diesel(sql_type = Nullable<Integer>)]
    key_id: Option<i32>,
}

/// Runs `sql` on the server's database: `SELECT`s give rows, anything
/// else the number of rows changed (as `Err`).
async fn sql(server: &TestServer, query: &str) -> Result<Vec<RawRow>, usize> {
    let url = server.db.as_ref().expect("database").url();
    let query = query.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = store::Manager::new(store::Backend::from_url(&url).unwrap())
            .connect()
            .unwrap();
        let select = query.trim_start().starts_with("SELECT");
        macro_rules! run {
            ($c:expr) => {
                if select {
                    Ok(diesel::sql_query(&query).load::<RawRow>($c).unwrap())
                } else {
                    Err(diesel::sql_query(&query).execute($c).unwrap())
                }
            };
        }
        match &mut conn {
            Conn::Pg(c) => run!(c),
            Conn::Sqlite(c) => run!(c),
        }
    })
    .await
    .unwrap()
}

async fn rows(server: &TestServer) -> Vec<RawRow> {
    sql(
        server,
        "SELECT account, device_id, guid, source, source_device, content, key_id \
         FROM mailbox ORDER BY guid",
    )
    .await
    .expect("a select")
}

async fn update(server: &TestServer, query: &str) -> usize {
    sql(server, query).await.expect_err("an update")
}

/// `d` as a client of `server` (after a restart, on another port).
fn on(server: &TestServer, d: &TestDevice) -> TestDevice {
    TestDevice {
        base: server.url(""),
        ..d.clone()
    }
}

/// `from` sends `content` to `to` (one device); the stored copy's guid.
async fn send(from: &TestDevice, to: &TestDevice, content: &[u8]) -> String {
    let (status, body) = from.send(&to.uuid, &[to.target()], content).await;
    assert_eq!(status, StatusCode::OK, "send: {body}");
    body["results"][0]["guid"]
        .as_str()
        .expect("guid")
        .to_owned()
}

/// An unidentified (sealed-sender) send of `content` to `to`, with the
/// access key `access`.
async fn send_sealed(to: &TestDevice, access: &[u8; 16], content: &[u8]) -> String {
    let body = json!({
        "timestamp": TIMESTAMP,
        "online": false,
        "messages": [{
            "destinationDeviceId": to.device_id,
            "destinationRegistrationId": to.registration_id,
            "type": 6,
            "content": b64(content),
        }],
    });
    let res = http()
        .put(format!("{}/v1/messages/{}", to.base, to.uuid))
        .header("Unidentified-Access-Key", b64(access))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = res.status();
    let body: Value = res.json().await.expect("json");
    assert_eq!(status, StatusCode::OK, "sealed send: {body}");
    body["results"][0]["guid"]
        .as_str()
        .expect("guid")
        .to_owned()
}

/// What the device must receive for a copy: `(guid, source, sourceDevice,
/// type, content)`.
type Expected = (String, Option<String>, Option<u64>, i64, Vec<u8>);

fn shape(e: &Value) -> Expected {
    (
        e["guid"].as_str().expect("guid").to_owned(),
        e["source"].as_str().map(str::to_owned),
        e["sourceDevice"].as_u64(),
        e["type"].as_i64().expect("type"),
        unb64(e["content"].as_str().expect("content")),
    )
}

fn identified(guid: &str, from: &TestDevice, content: &[u8]) -> Expected {
    (
        guid.to_owned(),
        Some(from.uuid.clone()),
        Some(u64::from(from.device_id)),
        1,
        content.to_vec(),
    )
}

/// The device gets exactly `expected`, in order, over `GET /v1/messages`
/// and over a WebSocket replay (nothing is acknowledged).
async fn receives(d: &TestDevice, expected: &[Expected]) {
    let (page, more) = mailbox_page(d).await;
    assert!(!more);
    assert_eq!(page.iter().map(shape).collect::<Vec<_>>(), expected, "HTTP");
    for e in &page {
        assert_eq!(e["timestamp"].as_i64(), Some(TIMESTAMP));
    }
    let mut ws = d.connect().await;
    let replayed = ws.drain_queue().await;
    assert_eq!(
        replayed.iter().map(shape).collect::<Vec<_>>(),
        expected,
        "WebSocket replay"
    );
    ws.close().await;
}

/// With a key, every row (identified or sealed-sender) holds no sender and
/// no content in the clear, and names its key; the device gets exactly the
/// envelopes that were sent.
async fn sealed_rows_hide_sender_and_content(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.storage_key = Some(key_b64(1))).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let access = [7u8; 16];
    let (status, body) = bob
        .request(
            Method::PUT,
            "/v1/accounts/attributes",
            Some(&json!({
                "unidentifiedAccessKey": b64(&access),
                "unrestrictedUnidentifiedAccess": false,
            })),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "attributes: {body}");

    let contents: Vec<Vec<u8>> = (0..3)
        .map(|i| format!("the ciphertext alice sent, number {i}").into_bytes())
        .collect();
    let mut expected = Vec::new();
    for content in &contents {
        let guid = send(&alice, &bob, content).await;
        expected.push(identified(&guid, &alice, content));
    }
    let sealed = b"a sealed-sender ciphertext".to_vec();
    let guid = send_sealed(&bob, &access, &sealed).await;
    expected.push((guid, None, None, 6, sealed.clone()));

    let stored = rows(&server).await;
    assert_eq!(stored.len(), expected.len());
    for row in &stored {
        assert_eq!(row.account, bob.uuid, "the recipient stays in the clear");
        assert_eq!(row.device_id, i64::from(bob.device_id));
        assert_eq!(row.source, None, "no sender beside the recipient");
        assert_eq!(row.source_device, None);
        assert_eq!(row.key_id, Some(key_id(&key(1))));
        for secret in contents.iter().chain([&sealed]) {
            assert!(
                !row.content
                    .windows(secret.len())
                    .any(|w| w == secret.as_slice()),
                "content in the clear in row {}",
                row.guid
            );
        }
        let alice_bytes = uuid::Uuid::parse_str(&alice.uuid).unwrap();
        assert!(!row.content.windows(16).any(|w| w == alice_bytes.as_bytes()));
        assert!(!row
            .content
            .windows(alice.uuid.len())
            .any(|w| w == alice.uuid.as_bytes()));
    }
    receives(&bob, &expected).await;

    // Acknowledged copies are deleted as always.
    for (guid, ..) in &expected {
        let (status, _) = bob
            .request(Method::DELETE, &format!("/v1/messages/{guid}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    mailbox_empties(&bob).await;
}

/// Rows in the clear (written before the key was set), rows under key A and
/// rows under key B all read back, in order, while B is current and A is
/// previous. With B alone, A's rows are skipped (logged, not fatal) and the
/// rest read; the server does not crash.
async fn rotation_reads_old_rows_and_a_dropped_key_skips_its_rows(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let mut all = Vec::new();
    let clear = b"written in the clear".to_vec();
    all.push(identified(
        &send(&alice, &bob, &clear).await,
        &alice,
        &clear,
    ));

    let restart = |server: TestServer, current: Option<u8>, previous: Option<u8>| async move {
        let mut server = server;
        server.config.storage_key = current.map(key_b64);
        server.config.storage_key_previous = previous.map(key_b64);
        server.restart().await
    };
    let server = restart(server, Some(1), None).await;
    let (alice, bob) = (on(&server, &alice), on(&server, &bob));
    for i in 0..2 {
        let content = format!("under key A, {i}").into_bytes();
        all.push(identified(
            &send(&alice, &bob, &content).await,
            &alice,
            &content,
        ));
    }
    let server = restart(server, Some(2), Some(1)).await;
    let (alice, bob) = (on(&server, &alice), on(&server, &bob));
    for i in 0..2 {
        let content = format!("under key B, {i}").into_bytes();
        all.push(identified(
            &send(&alice, &bob, &content).await,
            &alice,
            &content,
        ));
    }

    let ids: Vec<Option<i32>> = rows(&server).await.iter().map(|r| r.key_id).collect();
    let (a, b) = (key_id(&key(1)), key_id(&key(2)));
    assert_eq!(ids, [None, Some(a), Some(a), Some(b), Some(b)]);
    let clear_row = &rows(&server).await[0];
    assert_eq!(clear_row.source.as_deref(), Some(alice.uuid.as_str()));
    assert_eq!(clear_row.content, clear);
    receives(&bob, &all).await;

    // Key A dropped too early: its rows are lost to the server, the others read.
    let server = restart(server, Some(2), None).await;
    let (alice, bob) = (on(&server, &alice), on(&server, &bob));
    let left: Vec<Expected> = [&all[0], &all[3], &all[4]].into_iter().cloned().collect();
    receives(&bob, &left).await;
    // The server still works: a new copy is stored and read.
    let content = b"after the key was dropped".to_vec();
    let guid = send(&alice, &bob, &content).await;
    let mut left = left;
    left.push(identified(&guid, &alice, &content));
    receives(&bob, &left).await;
    drop(server);
}

/// A sealed row is bound to its recipient device and its guid: moved to
/// another device's mailbox, or given another guid, it does not open (it
/// is skipped), and the rows left in place still read.
async fn a_row_moved_elsewhere_does_not_open(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.storage_key = Some(key_b64(3))).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let to_device = send(&alice, &bob, b"moved to another device").await;
    let to_account = send(&alice, &bob, b"moved to another account").await;
    let renamed = send(&alice, &bob, b"given another guid").await;
    let kept = send(&alice, &bob, b"left where it was").await;
    let bob2 = bob.link().await;

    let other_guid = uuid::Uuid::now_v7();
    for query in [
        format!(
            "UPDATE mailbox SET device_id = {} WHERE guid = '{to_device}'",
            bob2.device_id
        ),
        format!(
            "UPDATE mailbox SET account = '{}', device_id = {} WHERE guid = '{to_account}'",
            alice.uuid, alice.device_id
        ),
        format!("UPDATE mailbox SET guid = '{other_guid}' WHERE guid = '{renamed}'"),
    ] {
        assert_eq!(update(&server, &query).await, 1, "{query}");
    }

    receives(&bob, &[identified(&kept, &alice, b"left where it was")]).await;
    receives(&bob2, &[]).await;
    receives(&alice, &[]).await;
}

/// `GET /v1/messages` reads past a full page of rows it cannot open (their
/// key was dropped) to the copies it can, instead of answering an empty
/// page that says `more`.
async fn http_fetch_reads_past_rows_it_cannot_open(backend: Backend) {
    let mut server = TestServer::start_with(backend, |c| c.storage_key = Some(key_b64(4))).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    for i in 0..130 {
        send(&alice, &bob, format!("lost {i}").as_bytes()).await;
    }
    server.config.storage_key = Some(key_b64(5));
    let server = server.restart().await;
    let (alice, bob) = (on(&server, &alice), on(&server, &bob));
    let guid = send(&alice, &bob, b"readable").await;
    let (status, page) = bob.request(Method::GET, "/v1/messages", None).await;
    assert_eq!(status, StatusCode::OK);
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{page}");
    assert_eq!(messages[0]["guid"], guid.as_str());
    assert_eq!(page["more"], false);
}

backends!(
    http_fetch_reads_past_rows_it_cannot_open,
    sealed_rows_hide_sender_and_content,
    rotation_reads_old_rows_and_a_dropped_key_skips_its_rows,
    a_row_moved_elsewhere_does_not_open,
);
