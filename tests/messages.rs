//! Messages over HTTP (SPEC "Messages", "Delivery guarantee"): send, fetch and
//! acknowledge; the Sesame device-set check; ephemeral sends; the mailbox
//! surviving a restart. Real server, real sockets, both storage backends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

// ---- mailbox: offline sends, restart, fetch, acknowledge ----

async fn offline_copies_survive_restart_and_replay_in_order(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let mut b = TestDevice::register(&server).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let content = format!("offline #{i}").into_bytes();
        let (status, body) = a.send(&b.uuid, &[b.target()], &content).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let r = results(&body);
        assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![1], "{body}");
        assert_eq!(r[&1].1, "queued", "offline device: {body}");
        sent.push((r[&1].0.clone(), content));
    }

    let server = server.restart().await;
    b.base = server.url("");
    let mut ws = b.connect().await;
    let (_, before) = ws.until_op("queue-empty").await;
    assert_eq!(
        before.len(),
        sent.len(),
        "stored copies then queue-empty: {before:?}"
    );
    for (frame, (guid, content)) in before.iter().zip(&sent) {
        assert_eq!(frame["op"], "message", "{frame}");
        assert_envelope(&frame["envelope"], guid, &a, content);
    }
    for (guid, _) in &sent {
        ws.ack(guid).await;
    }
    let late = round_trip(&mut ws).await;
    assert!(late.is_empty(), "nothing after queue-empty: {late:?}");
    ws.close().await;

    // Acknowledged means gone: a new connection has only queue-empty.
    let mut ws = b.connect().await;
    assert_eq!(ws.next_json().await, json!({"op": "queue-empty"}));
    assert_silent(&mut ws, Duration::from_millis(300)).await;
    mailbox_empties(&b).await;
}

async fn fetch_pages_oldest_first_with_more_flag(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    const N: usize = 103;
    let mut guids = Vec::new();
    for i in 0..N {
        let (status, body) = a
            .send(&b.uuid, &[b.target()], format!("m{i}").as_bytes())
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        guids.push(results(&body)[&1].0.clone());
    }

    let (page, more) = mailbox_page(&b).await;
    assert!(more, "{N} stored, one page shown: more must be true");
    assert!(
        !page.is_empty() && page.len() < N,
        "a page, not all: {}",
        page.len()
    );
    for (i, env) in page.iter().enumerate() {
        assert_envelope(env, &guids[i], &a, format!("m{i}").as_bytes());
    }
    // Fetching does not consume: the same page again.
    let (again, _) = mailbox_page(&b).await;
    assert_eq!(again, page);

    // Acknowledge what was shown; the rest comes next, oldest first.
    let shown = page.len();
    for env in &page {
        let guid = env["guid"].as_str().expect("guid");
        let (status, body) = b
            .request(Method::DELETE, &format!("/v1/messages/{guid}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let (rest, more) = mailbox_page(&b).await;
    assert!(!more, "the remainder fits one page");
    let rest_guids: Vec<&str> = rest.iter().map(|e| e["guid"].as_str().unwrap()).collect();
    let expected: Vec<&str> = guids[shown..].iter().map(String::as_str).collect();
    assert_eq!(rest_guids, expected);
}

async fn delete_acknowledges_once_and_only_own_copies(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b1 = TestDevice::register(&server).await;
    let b2 = b1.link().await;
    let (status, body) = a.send(&b1.uuid, &[b1.target(), b2.target()], b"both").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r = results(&body);
    assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert!(r.values().all(|(_, s)| s == "queued"), "{body}");
    let (g1, g2) = (r[&1].0.clone(), r[&2].0.clone());
    assert_ne!(g1, g2, "each copy has its own guid");

    // Another device's guid: 404, and the copy stays for its owner.
    let (status, body) = b2
        .request(Method::DELETE, &format!("/v1/messages/{g1}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    let (status, _) = a
        .request(Method::DELETE, &format!("/v1/messages/{g1}"), None)
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the sender cannot ack it either"
    );
    // Nor over b2's WebSocket: an ack is scoped to the acking device.
    let mut ws2 = b2.connect().await;
    let stored = ws2.drain_queue().await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_envelope(&stored[0], &g2, &a, b"both");
    ws2.ack(&g1).await;
    assert!(round_trip(&mut ws2).await.is_empty());
    ws2.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (m1, _) = mailbox_page(&b1).await;
    assert_eq!(m1.len(), 1);
    assert_envelope(&m1[0], &g1, &a, b"both");

    // The owner: 204, then 404 on repeat; gone for good.
    let (status, body) = b1
        .request(Method::DELETE, &format!("/v1/messages/{g1}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = b1
        .request(Method::DELETE, &format!("/v1/messages/{g1}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(mailbox_page(&b1).await.0.is_empty());

    // b2's copy was untouched by all of that.
    let (m2, _) = mailbox_page(&b2).await;
    assert_eq!(m2.len(), 1);
    assert_envelope(&m2[0], &g2, &a, b"both");
    let (status, _) = b2
        .request(Method::DELETE, "/v1/messages/not-a-guid", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// ---- the Sesame device-set check ----

/// B has a primary and a linked device; the primary is connected and idle.
struct TwoDevices {
    ws1: Ws,
    a: TestDevice,
    b1: TestDevice,
    b2: TestDevice,
    _server: TestServer,
}

impl TwoDevices {
    async fn start(backend: Backend) -> TwoDevices {
        let server = TestServer::start(backend).await;
        let a = TestDevice::register(&server).await;
        let b1 = TestDevice::register(&server).await;
        let b2 = b1.link().await;
        let ws1 = connect_empty(&b1).await;
        TwoDevices {
            ws1,
            a,
            b1,
            b2,
            _server: server,
        }
    }

    /// Nothing from a refused send reached B: no push, empty mailboxes.
    async fn nothing_delivered(&mut self) {
        assert_silent(&mut self.ws1, Duration::from_millis(400)).await;
        assert!(mailbox_page(&self.b2).await.0.is_empty(), "b2 got a copy");
        let others = round_trip(&mut self.ws1).await;
        assert!(others.is_empty(), "b1 got {others:?}");
        assert!(mailbox_page(&self.b1).await.0.is_empty(), "b1 got a copy");
    }
}

async fn missing_device_is_409_and_nothing_delivered(backend: Backend) {
    let mut t = TwoDevices::start(backend).await;
    let (status, body) = t.a.send(&t.b1.uuid, &[t.b1.target()], b"only one").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "mismatched_devices", "{body}");
    assert_eq!(body["missingDevices"], json!([2]), "{body}");
    assert_eq!(body["extraDevices"], json!([]), "{body}");
    assert!(body["message"].is_string(), "{body}");
    t.nothing_delivered().await;
}

async fn extra_device_is_409_and_nothing_delivered(backend: Backend) {
    let mut t = TwoDevices::start(backend).await;
    let copies = [t.b1.target(), t.b2.target(), (3, 77)];
    let (status, body) = t.a.send(&t.b1.uuid, &copies, b"one too many").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "mismatched_devices", "{body}");
    assert_eq!(body["missingDevices"], json!([]), "{body}");
    assert_eq!(body["extraDevices"], json!([3]), "{body}");
    t.nothing_delivered().await;

    // A removed device is extra too.
    let (status, body) =
        t.b1.request(
            Method::DELETE,
            &format!("/v1/devices/{}", t.b2.device_id),
            None,
        )
        .await;
    assert!(status.is_success(), "remove b2: {body}");
    let (status, body) =
        t.a.send(&t.b1.uuid, &[t.b1.target(), t.b2.target()], b"stale list")
            .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["extraDevices"], json!([2]), "{body}");
    assert_eq!(body["missingDevices"], json!([]), "{body}");
    assert_silent(&mut t.ws1, Duration::from_millis(300)).await;
    assert!(mailbox_page(&t.b1).await.0.is_empty());
}

async fn stale_registration_is_410_and_nothing_delivered(backend: Backend) {
    let mut t = TwoDevices::start(backend).await;
    let wrong = t.b2.registration_id % 16000 + 1;
    let copies = [t.b1.target(), (t.b2.device_id, wrong)];
    let (status, body) = t.a.send(&t.b1.uuid, &copies, b"old session").await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(body["error"], "stale_devices", "{body}");
    assert_eq!(body["staleDevices"], json!([2]), "{body}");
    t.nothing_delivered().await;

    // The corrected send goes through to both.
    let (status, body) =
        t.a.send(&t.b1.uuid, &[t.b1.target(), t.b2.target()], b"fixed")
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn own_account_send_goes_to_other_devices_only(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a1 = TestDevice::register(&server).await;
    let a2 = a1.link().await;
    let a3 = a1.link().await;
    let mut ws1 = connect_empty(&a1).await;

    // Including the sender's own device: 409, it is extra.
    let copies = [a1.target(), a2.target(), a3.target()];
    let (status, body) = a1.send(&a1.uuid, &copies, b"note to self").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["extraDevices"], json!([1]), "{body}");
    assert_eq!(body["missingDevices"], json!([]), "{body}");
    // Leaving a sibling out: 409 missing.
    let (status, body) = a1.send(&a1.uuid, &[a2.target()], b"note to self").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["missingDevices"], json!([3]), "{body}");
    assert_eq!(body["extraDevices"], json!([]), "{body}");
    assert!(mailbox_page(&a2).await.0.is_empty());
    assert!(mailbox_page(&a3).await.0.is_empty());

    // Every other device: accepted, and the sender's device gets nothing.
    let (status, body) = a1
        .send(&a1.uuid, &[a2.target(), a3.target()], b"note to self")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r = results(&body);
    assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![2, 3], "{body}");
    for (device, sibling) in [(2, &a2), (3, &a3)] {
        let (m, _) = mailbox_page(sibling).await;
        assert_eq!(m.len(), 1, "device {device}");
        assert_envelope(&m[0], &r[&device].0, &a1, b"note to self");
    }
    assert_silent(&mut ws1, Duration::from_millis(300)).await;
    assert!(mailbox_page(&a1).await.0.is_empty());

    // A linked device writing to its own account excludes itself, not device 1.
    let (status, body) = a2
        .send(&a2.uuid, &[a1.target(), a3.target()], b"from two")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (m, _) = within("push to a1", ws1.until_op("message")).await;
    assert_eq!(m["envelope"]["sourceDevice"], 2, "{m}");
}

async fn unknown_destination_account_is_404(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let nobody = "5f0c1f8e-8d2a-4c8e-9a55-0d4c1b2a3e4f";
    let (status, body) = a.send(nobody, &[(1, 1)], b"hello?").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    // Not a UUID at all: malformed, not a crash.
    let (status, body) = a.send("not-a-uuid", &[(1, 1)], b"hello?").await;
    assert!(status.is_client_error(), "{status} {body}");
}

async fn malformed_sends_are_400(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let path = format!("/v1/messages/{}", b.uuid);
    let (dev, reg) = b.target();
    let cases = [
        json!({"messages": []}),
        json!({"timestamp": 1, "messages": [{"destinationDeviceId": dev, "destinationRegistrationId": reg, "type": 1, "content": "not base64!"}]}),
        json!({"timestamp": 1, "messages": [{"destinationDeviceId": dev, "destinationRegistrationId": reg, "type": 1, "content": ""}]}),
        json!({"timestamp": 1, "messages": [
            {"destinationDeviceId": dev, "destinationRegistrationId": reg, "type": 1, "content": "aGk="},
            {"destinationDeviceId": dev, "destinationRegistrationId": reg, "type": 1, "content": "aGk="}]}),
        json!({"timestamp": 1, "messages": "nope"}),
        json!([1, 2, 3]),
    ];
    for body in &cases {
        let (status, answer) = a.request(Method::PUT, &path, Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        assert_eq!(answer["error"], "bad_request", "{answer}");
    }
    assert!(mailbox_page(&b).await.0.is_empty());
    let (status, _) = call(
        Method::PUT,
        &server.url(&path),
        None,
        Some(&send_body(&[b.target()], b"anonymous", false)),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(mailbox_page(&b).await.0.is_empty());
}

// ---- ephemeral sends ----

async fn ephemeral_to_offline_device_is_dropped_and_not_stored(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b1 = TestDevice::register(&server).await;
    let b2 = b1.link().await;
    let mut ws1 = connect_empty(&b1).await;
    let body = send_body(&[b1.target(), b2.target()], b"typing...", true);
    let (status, answer) = a
        .request(
            Method::PUT,
            &format!("/v1/messages/{}", b1.uuid),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let r = results(&answer);
    assert_eq!(r[&1].1, "delivered", "connected device: {answer}");
    assert_eq!(r[&2].1, "dropped", "offline device: {answer}");
    // The connected one saw it (and never acked it).
    let (frame, _) = ws1.until_op("message").await;
    assert_envelope(&frame["envelope"], &r[&1].0, &a, b"typing...");

    // Never stored: not in the mailbox, not on a later connection.
    assert!(
        mailbox_page(&b2).await.0.is_empty(),
        "ephemeral copy was stored"
    );
    let mut ws2 = b2.connect().await;
    assert_eq!(ws2.next_json().await, json!({"op": "queue-empty"}));
    assert_silent(&mut ws2, Duration::from_millis(300)).await;
}

async fn ephemeral_to_connected_device_is_delivered_without_ack(backend: Backend) {
    // A long ack timeout: were the answer waiting for an ack, it would take
    // seconds and end `queued`; an ephemeral push is answered at once.
    let server = TestServer::start_with(backend, |c| c.ack_timeout_ms = 5_000).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut ws = connect_empty(&b).await;
    let body = send_body(&[b.target()], b"typing", true);
    let started = std::time::Instant::now();
    let (status, answer) = within(
        "ephemeral send",
        a.request(
            Method::PUT,
            &format!("/v1/messages/{}", b.uuid),
            Some(&body),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered only after {:?}: it waited for an ack",
        started.elapsed()
    );
    let r = results(&answer);
    assert_eq!(r[&1].1, "delivered", "{answer}");
    let (frame, _) = ws.until_op("message").await;
    assert_envelope(&frame["envelope"], &r[&1].0, &a, b"typing");

    // Unacked, yet never spilled: nothing stored, nothing on reconnect.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        mailbox_page(&b).await.0.is_empty(),
        "ephemeral copy was stored"
    );
    ws.close().await;
    let mut ws = b.connect().await;
    assert_eq!(ws.next_json().await, json!({"op": "queue-empty"}));
    assert_silent(&mut ws, Duration::from_millis(300)).await;
}

// ---- size ----

async fn oversize_content_is_413(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let (status, body) = a
        .send(&b.uuid, &[b.target()], &vec![7u8; 256 * 1024 + 1])
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "too_large", "{body}");
    assert!(mailbox_page(&b).await.0.is_empty());

    // Exactly 256 KiB is allowed and arrives intact.
    let max = vec![9u8; 256 * 1024];
    let (status, body) = a.send(&b.uuid, &[b.target()], &max).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (m, _) = mailbox_page(&b).await;
    assert_eq!(m.len(), 1);
    assert_eq!(content_of(&m[0]), max);
}

/// A device set in use is read again before its cache entry expires, and no
/// send waits for that read: a device linked through another process sharing
/// the database (not a cluster member, so this server is not told) is in the
/// Sesame check before the entry's `device_cache_ttl_ms` is over. Before,
/// the entry was used until it expired and then every send read it again.
async fn busy_device_set_is_read_again_before_it_expires(backend: Backend) {
    const TTL: Duration = Duration::from_millis(4_000);
    let server =
        TestServer::start_with(backend, |c| c.device_cache_ttl_ms = TTL.as_millis() as u64).await;
    let other = TestServer::launch_node(server.config.clone()).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let (status, body) = a.send(&b.uuid, &[b.target()], b"caches b's set").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The entry was made before this instant.
    let cached = Instant::now();
    let b_elsewhere = TestDevice {
        base: other.url(""),
        ..b.clone()
    };
    let b2 = b_elsewhere.link().await;
    let (status, body) = a.send(&b.uuid, &[b.target()], b"fresh entry").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a fresh entry is used as it is: {body}"
    );

    // Past the age at which an entry in use is read again (half to three
    // quarters of the TTL): the send is still checked against the entry
    // (so it is answered without a read), and starts the read.
    tokio::time::sleep_until((cached + TTL * 76 / 100).into()).await;
    let (status, body) = a.send(&b.uuid, &[b.target()], b"due entry").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "an entry due for a read is used: {body}"
    );

    // The read comes back long before the entry would have expired.
    loop {
        let (status, body) = a.send(&b.uuid, &[b.target()], b"after the read").await;
        if status == StatusCode::CONFLICT {
            assert_eq!(body["missingDevices"], json!([b2.device_id]), "{body}");
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            cached.elapsed() < TTL * 95 / 100,
            "the linked device is still unseen near the end of the TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = a
        .send(&b.uuid, &[b.target(), b2.target()], b"both devices")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(other);
}

backends!(
    busy_device_set_is_read_again_before_it_expires,
    offline_copies_survive_restart_and_replay_in_order,
    fetch_pages_oldest_first_with_more_flag,
    delete_acknowledges_once_and_only_own_copies,
    missing_device_is_409_and_nothing_delivered,
    extra_device_is_409_and_nothing_delivered,
    stale_registration_is_410_and_nothing_delivered,
    own_account_send_goes_to_other_devices_only,
    unknown_destination_account_is_404,
    malformed_sends_are_400,
    ephemeral_to_offline_device_is_dropped_and_not_stored,
    ephemeral_to_connected_device_is_delivered_without_ack,
    oversize_content_is_413,
);
