//! Realtime delivery over `/v1/websocket` (SPEC "Delivery guarantee",
//! "WebSocket"): live pushes answered only after acks, spills on drop and on
//! ack timeout, late acks, replaced connections, per-sender order, frame
//! errors, query-string login. Real server, real sockets, both backends.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A new connection that has nothing at all waiting for it.
async fn assert_nothing_waiting(d: &TestDevice) {
    let mut ws = d.connect().await;
    assert_eq!(ws.next_json().await, json!({"op": "queue-empty"}));
    assert_silent(&mut ws, Duration::from_millis(300)).await;
    ws.close().await;
}

/// The sequence number a pipelined message carries in its content.
fn seq_of(env: &Value) -> usize {
    let text = String::from_utf8(content_of(env)).expect("utf-8 content");
    text.strip_prefix("seq:")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected content {text:?}"))
}

/// Writes the `send` frames for `seqs` back to back, without waiting.
async fn pipeline(
    sink: &mut SplitSink<Socket, Message>,
    dest: &str,
    target: (u32, i64),
    seqs: std::ops::Range<usize>,
) {
    for i in seqs {
        let frame = send_frame(
            i as u64,
            dest,
            &[target],
            format!("seq:{i}").as_bytes(),
            false,
        );
        sink.feed(Message::Text(frame.to_string()))
            .await
            .expect("ws feed");
    }
    sink.flush().await.expect("ws flush");
}

/// Reads `n` `response` frames; returns them by id, asserting ids are unique.
async fn responses(stream: &mut SplitStream<Socket>, n: usize) -> BTreeMap<u64, Value> {
    let mut by_id = BTreeMap::new();
    while by_id.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("responses stalled")
            .expect("socket ended")
            .expect("socket error");
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).expect("JSON frame");
        assert_eq!(v["op"], "response", "{v}");
        let id = v["id"].as_u64().expect("id");
        assert!(by_id.insert(id, v).is_none(), "two responses for id {id}");
    }
    by_id
}

// ---- live delivery ----

async fn live_send_to_two_devices_is_answered_after_both_acks(backend: Backend) {
    // The ack timeout is long so that "still pending" below can only mean
    // "waiting for b2's ack", never a timing accident.
    let server = TestServer::start_with(backend, |c| c.ack_timeout_ms = 5_000).await;
    let a = TestDevice::register(&server).await;
    let b1 = TestDevice::register(&server).await;
    let b2 = b1.link().await;
    let mut ws1 = connect_empty(&b1).await;
    let mut ws2 = connect_empty(&b2).await;

    let (sender, dest, copies) = (a.clone(), b1.uuid.clone(), [b1.target(), b2.target()]);
    let send = tokio::spawn(async move { sender.send(&dest, &copies, b"hello, B").await });

    let (m1, skipped) = ws1.until_op("message").await;
    assert!(skipped.is_empty(), "{skipped:?}");
    let (m2, skipped) = ws2.until_op("message").await;
    assert!(skipped.is_empty(), "{skipped:?}");
    let (g1, g2) = (
        m1["envelope"]["guid"].as_str().expect("guid").to_owned(),
        m2["envelope"]["guid"].as_str().expect("guid").to_owned(),
    );
    assert_ne!(g1, g2, "each device's copy has its own guid");
    assert_envelope(&m1["envelope"], &g1, &a, b"hello, B");
    assert_envelope(&m2["envelope"], &g2, &a, b"hello, B");
    assert_eq!(m1["envelope"]["sourceDevice"], 1);

    // b1 acks; b2 has not yet: the sender must still be waiting.
    ws1.ack(&g1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!send.is_finished(), "the send was answered before b2 acked");
    ws2.ack(&g2).await;
    let (status, body) = within("send answer", send).await.expect("send task");
    assert_eq!(status, StatusCode::OK, "{body}");
    let r = results(&body);
    assert_eq!(r.get(&1), Some(&(g1, "delivered".to_owned())), "{body}");
    assert_eq!(r.get(&2), Some(&(g2, "delivered".to_owned())), "{body}");

    // Delivered live: never stored, not pushed again.
    assert!(mailbox(&b1).await.is_empty());
    assert!(mailbox(&b2).await.is_empty());
    assert_silent(&mut ws1, Duration::from_millis(200)).await;
    ws1.close().await;
    ws2.close().await;
    assert_nothing_waiting(&b1).await;
    assert_nothing_waiting(&b2).await;
}

async fn dropped_socket_before_ack_queues_and_is_pushed_again(backend: Backend) {
    // Long ack timeout: a `queued` answer within it comes from the drop.
    let server = TestServer::start_with(backend, |c| c.ack_timeout_ms = 5_000).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut ws = connect_empty(&b).await;

    let (sender, dest, copies) = (a.clone(), b.uuid.clone(), [b.target()]);
    let send = tokio::spawn(async move { sender.send(&dest, &copies, b"don't lose me").await });
    let (m, _) = ws.until_op("message").await;
    let guid = m["envelope"]["guid"].as_str().expect("guid").to_owned();
    let dropped = Instant::now();
    drop(ws); // no ack, no close frame: the TCP connection just goes away

    let (status, body) = within("send answer", send).await.expect("send task");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        results(&body).get(&1),
        Some(&(guid.clone(), "queued".to_owned())),
        "{body}"
    );
    assert!(
        dropped.elapsed() < Duration::from_secs(3),
        "answered after {:?}: the drop did not spill, the ack timeout did",
        dropped.elapsed()
    );
    assert_eq!(guids(&mailbox(&b).await), vec![guid.clone()]);

    // The next connection gets the same copy (same guid) before queue-empty.
    let mut ws = b.connect().await;
    let stored = ws.drain_queue().await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_envelope(&stored[0], &guid, &a, b"don't lose me");
    ws.ack(&guid).await;
    assert!(round_trip(&mut ws).await.is_empty());
    mailbox_empties(&b).await;
    ws.close().await;
    assert_nothing_waiting(&b).await;
}

async fn unacked_copy_is_queued_after_ack_timeout_and_pushed_only_on_next_connection(
    backend: Backend,
) {
    let server = TestServer::start(backend).await; // ack timeout 300 ms
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut ws = connect_empty(&b).await;

    let started = Instant::now();
    let (status, body) = within("send", a.send(&b.uuid, &[b.target()], b"ack me")).await;
    let answered = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    let (guid, st) = results(&body)[&1].clone();
    assert_eq!(st, "queued", "never acked: {body}");
    assert!(
        answered >= Duration::from_millis(290),
        "queued after {answered:?}, before the 300 ms ack timeout ran out"
    );
    let (m, _) = ws.until_op("message").await;
    assert_envelope(&m["envelope"], &guid, &a, b"ack me");
    // Spilled: it is in the mailbox now.
    assert_eq!(guids(&mailbox(&b).await), vec![guid.clone()]);

    // Not pushed again during this connection.
    assert_silent(&mut ws, Duration::from_millis(900)).await;
    assert!(round_trip(&mut ws).await.is_empty());
    ws.close().await;

    // Pushed again on the next one, same guid.
    let mut ws = b.connect().await;
    let stored = ws.drain_queue().await;
    assert_eq!(guids(&stored), vec![guid.clone()]);
    assert_envelope(&stored[0], &guid, &a, b"ack me");
    ws.ack(&guid).await;
    assert!(round_trip(&mut ws).await.is_empty());
    ws.close().await;
    assert_nothing_waiting(&b).await;
    assert!(mailbox(&b).await.is_empty());
}

async fn late_ack_deletes_the_spilled_copy(backend: Backend) {
    let server = TestServer::start(backend).await; // ack timeout 300 ms
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut ws = connect_empty(&b).await;

    let (status, body) = a.send(&b.uuid, &[b.target()], b"late").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (late, st) = results(&body)[&1].clone();
    assert_eq!(st, "queued", "{body}");
    let (status, body) = a.send(&b.uuid, &[b.target()], b"never acked").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (unacked, st) = results(&body)[&1].clone();
    assert_eq!(st, "queued", "{body}");
    let (m, _) = ws.until_op("message").await;
    assert_eq!(m["envelope"]["guid"], late.as_str());
    let (m, _) = ws.until_op("message").await;
    assert_eq!(m["envelope"]["guid"], unacked.as_str());
    assert_eq!(
        guids(&mailbox(&b).await),
        vec![late.clone(), unacked.clone()]
    );

    // An ack from another device (the sender) does not touch b's copies.
    let mut ws_a = connect_empty(&a).await;
    ws_a.ack(&late).await;
    ws_a.ack(&unacked).await;
    assert!(round_trip(&mut ws_a).await.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        guids(&mailbox(&b).await),
        vec![late.clone(), unacked.clone()]
    );

    // Acked after its timeout: the ack deletes the mailbox copy.
    ws.ack(&late).await;
    assert!(round_trip(&mut ws).await.is_empty());
    for _ in 0..250 {
        if guids(&mailbox(&b).await) == vec![unacked.clone()] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(guids(&mailbox(&b).await), vec![unacked.clone()]);
    ws.close().await;

    // The next connection gets only the copy that was never acked.
    let mut ws = b.connect().await;
    let stored = ws.drain_queue().await;
    assert_eq!(guids(&stored), vec![unacked.clone()]);
    assert_envelope(&stored[0], &unacked, &a, b"never acked");
    ws.ack(&unacked).await;
    assert!(round_trip(&mut ws).await.is_empty());
    ws.close().await;
    assert_nothing_waiting(&b).await;
}

async fn newer_connection_closes_older_with_4409_and_keeps_unacked_copy(backend: Backend) {
    // Long ack timeout: the copy is spilled by the replacement, not a timer.
    let server = TestServer::start_with(backend, |c| c.ack_timeout_ms = 5_000).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let (status, body) = a.send(&b.uuid, &[b.target()], b"stored").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (stored, st) = results(&body)[&1].clone();
    assert_eq!(st, "queued");

    // The old connection gets the stored copy and a live one; acks neither.
    let mut old = b.connect().await;
    assert_eq!(guids(&old.drain_queue().await), vec![stored.clone()]);
    let (sender, dest, copies) = (a.clone(), b.uuid.clone(), [b.target()]);
    let send = tokio::spawn(async move { sender.send(&dest, &copies, b"in flight").await });
    let (m, _) = old.until_op("message").await;
    let live = m["envelope"]["guid"].as_str().expect("guid").to_owned();

    let replaced = Instant::now();
    let mut new = b.connect().await;
    assert_eq!(
        old.closed().await,
        Some(4409),
        "the older connection is closed with 4409 (connected elsewhere)"
    );
    let (status, body) = within("send answer", send).await.expect("send task");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        results(&body).get(&1),
        Some(&(live.clone(), "queued".to_owned())),
        "{body}"
    );
    assert!(replaced.elapsed() < Duration::from_secs(3), "spilled late");

    // Nothing lost, order kept: the new connection gets both (before or
    // just after queue-empty), or failing that the one after.
    let mut got: Vec<Value> = new.drain_queue().await;
    while let Some(Frame::Json(v)) = new.next_within(Duration::from_millis(500)).await {
        if v["op"] == "message" {
            got.push(v["envelope"].clone());
        }
    }
    if guids(&got) != vec![stored.clone(), live.clone()] {
        new.close().await;
        new = b.connect().await;
        let mut seen: BTreeSet<String> = BTreeSet::new();
        got.extend(new.drain_queue().await);
        got.retain(|e| seen.insert(e["guid"].as_str().unwrap_or_default().to_owned()));
    }
    assert_eq!(guids(&got), vec![stored.clone(), live.clone()]);
    assert_envelope(&got[0], &stored, &a, b"stored");
    assert_envelope(&got[1], &live, &a, b"in flight");
    new.ack(&stored).await;
    new.ack(&live).await;
    assert!(round_trip(&mut new).await.is_empty());
    mailbox_empties(&b).await;

    // The new connection is the live one now.
    let (sender, dest, copies) = (a.clone(), b.uuid.clone(), [b.target()]);
    let send = tokio::spawn(async move { sender.send(&dest, &copies, b"after").await });
    let (m, _) = new.until_op("message").await;
    let g = m["envelope"]["guid"].as_str().expect("guid").to_owned();
    new.ack(&g).await;
    let (status, body) = within("send answer", send).await.expect("send task");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(results(&body)[&1], (g, "delivered".to_owned()), "{body}");
    assert!(matches!(
        old.next_within(Duration::from_millis(100)).await,
        None | Some(Frame::Closed(_))
    ));
}

// ---- order ----

async fn thousand_pipelined_sends_arrive_in_order(backend: Backend) {
    const N: usize = 1_000;
    let server = TestServer::start(backend).await; // ack timeout 300 ms
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut rx = connect_empty(&b).await;
    let recipient = tokio::spawn(async move {
        let mut seen = Vec::with_capacity(N);
        while seen.len() < N {
            let v = rx.next_json().await;
            assert_eq!(v["op"], "message", "{v}");
            rx.ack(v["envelope"]["guid"].as_str().expect("guid")).await;
            seen.push(seq_of(&v["envelope"]));
        }
        (seen, rx)
    });

    let tx = connect_empty(&a).await;
    let (mut sink, mut stream) = tx.stream.split();
    let dest = b.uuid.clone();
    let target = b.target();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        pipeline(&mut sink, &dest, target, 0..N).await;
        sink
    });
    let answers = within("1,000 responses", responses(&mut stream, N)).await;
    let elapsed = started.elapsed();
    let _sink = writer.await.expect("writer");

    let ids: BTreeSet<u64> = answers.keys().copied().collect();
    assert_eq!(ids, (0..N as u64).collect(), "one response per send id");
    let mut delivered = 0;
    for (id, v) in &answers {
        assert_eq!(v["status"], 200, "send {id}: {v}");
        let st = results(&v["body"])[&1].1.clone();
        assert!(st == "delivered" || st == "queued", "send {id}: {v}");
        delivered += usize::from(st == "delivered");
    }
    eprintln!(
        "{backend:?}: {N} live sends answered in {elapsed:?} ({:.0} msg/s), {delivered} delivered live",
        N as f64 / elapsed.as_secs_f64()
    );

    let (seen, _rx) = within("recipient", recipient).await.expect("recipient");
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "out of order or duplicated"
    );
    // Everything was acked, in time or late: nothing is left stored.
    mailbox_empties(&b).await;
}

async fn recipient_connecting_midway_gets_mailbox_then_live_in_order(backend: Backend) {
    /// Sent in one pipelined burst; the recipient connects during it.
    const BURST: usize = 1_000;
    /// Answers (all `queued`) the sender has before the recipient connects.
    const CONNECT_AFTER: usize = 300;
    /// Sent once the burst is answered, so some copies surely go live.
    const N: usize = BURST + 100;
    let server = TestServer::start(backend).await; // ack timeout 300 ms
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let tx = connect_empty(&a).await;
    let (mut sink, mut stream) = tx.stream.split();
    let (dest, target) = (b.uuid.clone(), b.target());
    let writer = tokio::spawn(async move {
        pipeline(&mut sink, &dest, target, 0..BURST).await;
        sink
    });

    // The recipient is offline for the first answers, then connects while
    // the rest are in flight: copies are being spilled as it connects, some
    // reach it while it replays the mailbox, the tail after queue-empty.
    let before = within("first answers", responses(&mut stream, CONNECT_AFTER)).await;
    for (id, v) in &before {
        assert_eq!(v["status"], 200, "send {id}: {v}");
        assert_eq!(results(&v["body"])[&1].1, "queued", "send {id}: {v}");
    }
    let mut ws = b.connect().await;
    let recipient = tokio::spawn(async move {
        let mut order = Vec::new();
        let mut firsts = BTreeSet::new();
        let mut queue_empty_at = None;
        while firsts.len() < N || queue_empty_at.is_none() {
            let v = ws.next_json().await;
            if v["op"] == "queue-empty" {
                assert!(queue_empty_at.is_none(), "two queue-empty frames");
                queue_empty_at = Some(order.len());
                continue;
            }
            assert_eq!(v["op"], "message", "{v}");
            ws.ack(v["envelope"]["guid"].as_str().expect("guid")).await;
            let seq = seq_of(&v["envelope"]);
            firsts.insert(seq);
            order.push(seq);
        }
        (order, queue_empty_at, ws)
    });
    let mut after = within(
        "burst answers",
        responses(&mut stream, BURST - CONNECT_AFTER),
    )
    .await;
    let mut sink = writer.await.expect("writer");
    pipeline(&mut sink, &b.uuid, target, BURST..N).await;
    after.extend(within("tail answers", responses(&mut stream, N - BURST)).await);
    assert_eq!(after.len(), N - CONNECT_AFTER);
    for (id, v) in &after {
        assert!(!before.contains_key(id), "two responses for send {id}");
        assert_eq!(v["status"], 200, "send {id}: {v}");
    }

    let (order, queue_empty_at, _ws) = within("recipient", recipient).await.expect("recipient");
    // Duplicates are allowed; first occurrences must be in send order.
    let mut seen = BTreeSet::new();
    let firsts: Vec<usize> = order.iter().copied().filter(|s| seen.insert(*s)).collect();
    assert_eq!(firsts, (0..N).collect::<Vec<_>>(), "out of order");
    // Everything stored when it connected came before queue-empty.
    let qe = queue_empty_at.expect("queue-empty was sent");
    let replayed: BTreeSet<usize> = order[..qe].iter().copied().collect();
    for id in before.keys() {
        assert!(
            replayed.contains(&(*id as usize)),
            "send {id} was stored before connecting but came after queue-empty"
        );
    }
    eprintln!(
        "{backend:?}: {qe} pushed before queue-empty, {} after",
        order.len() - qe
    );
    mailbox_empties(&b).await;
}

/// Sends go straight from the sender's thread to the recipient's session
/// (`router::Live`); a replacement midway must still hand every copy to one
/// connection or the other, and the new connection must see the rest in
/// send order (the old one's unacknowledged copies from the mailbox first).
async fn a_device_replaced_midway_gets_every_copy_in_order(backend: Backend) {
    const N: usize = 1_000;
    /// Copies the first connection reads before the second one opens.
    const REPLACE_AFTER: usize = 200;
    let server = TestServer::start(backend).await; // ack timeout 300 ms
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut first = connect_empty(&b).await;
    let tx = connect_empty(&a).await;
    let (mut sink, mut stream) = tx.stream.split();
    let (dest, target) = (b.uuid.clone(), b.target());
    let writer = tokio::spawn(async move {
        pipeline(&mut sink, &dest, target, 0..N).await;
        sink
    });

    // The first connection reads and acks a prefix, in order.
    let mut on_first = Vec::new();
    while on_first.len() < REPLACE_AFTER {
        let v = first.next_json().await;
        assert_eq!(v["op"], "message", "{v}");
        first
            .ack(v["envelope"]["guid"].as_str().expect("guid"))
            .await;
        on_first.push(seq_of(&v["envelope"]));
    }
    assert_eq!(on_first, (0..REPLACE_AFTER).collect::<Vec<_>>());
    // Replaced while the burst is in flight.
    let mut second = b.connect().await;
    let recipient = tokio::spawn(async move {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut queue_empty = false;
        while seen.len() < N - REPLACE_AFTER || !queue_empty {
            let v = second.next_json().await;
            if v["op"] == "queue-empty" {
                queue_empty = true;
                continue;
            }
            assert_eq!(v["op"], "message", "{v}");
            second
                .ack(v["envelope"]["guid"].as_str().expect("guid"))
                .await;
            let seq = seq_of(&v["envelope"]);
            if seq >= REPLACE_AFTER {
                seen.insert(seq);
            }
            order.push(seq);
        }
        (order, second)
    });
    let answers = within("1,000 responses", responses(&mut stream, N)).await;
    let _sink = writer.await.expect("writer");
    for (id, v) in &answers {
        assert_eq!(v["status"], 200, "send {id}: {v}");
    }
    // The first connection was told it was replaced; what it still got
    // after the prefix it did not ack, and the second one has it too.
    let mut closed = false;
    while let Some(frame) = first.next_within(Duration::from_secs(2)).await {
        if let Frame::Closed(code) = frame {
            assert_eq!(code, Some(4409));
            closed = true;
            break;
        }
    }
    assert!(closed, "the replaced connection was not closed with 4409");

    let (order, _second) = within("second connection", recipient)
        .await
        .expect("recipient");
    // Copies the first connection acknowledged may come again (an ack
    // racing the replacement); past them, first occurrences in send order.
    let mut seen = BTreeSet::new();
    let firsts: Vec<usize> = order
        .iter()
        .copied()
        .filter(|s| *s >= REPLACE_AFTER && seen.insert(*s))
        .collect();
    assert_eq!(
        firsts,
        (REPLACE_AFTER..N).collect::<Vec<_>>(),
        "lost or out of order"
    );
    mailbox_empties(&b).await;
}

// ---- frames ----

async fn non_json_frame_gets_error_and_connection_stays_open(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut ws = connect_empty(&a).await;
    for junk in ["this is not JSON", "{\"op\":", "", "null", "42", "[1,2]"] {
        ws.send_text(junk).await;
        let v = ws.next_json().await;
        assert_eq!(v["op"], "error", "{junk:?} → {v}");
        assert!(v["message"].is_string(), "{v}");
    }
    // Still open and working.
    let (r, others) = ws
        .send_and_wait(1, &b.uuid, send_body(&[b.target()], b"still here", false))
        .await;
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(results(&r["body"])[&1].1, "queued");
    assert_eq!(mailbox(&b).await.len(), 1);
}

async fn invalid_send_body_gets_400_response_with_its_id(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut ws = connect_empty(&a).await;
    let (dev, reg) = b.target();
    let copy = |content: &str| json!({"destinationDeviceId": dev, "destinationRegistrationId": reg, "type": 1, "content": content});
    let cases = [
        // No body at all.
        json!({"op": "send", "id": 5}),
        // No destination.
        json!({"op": "send", "id": 6, "timestamp": 1, "messages": [copy("aGk=")]}),
        // Content not base64.
        json!({"op": "send", "id": 7, "destination": b.uuid, "timestamp": 1, "messages": [copy("%%%")]}),
        // Empty content.
        json!({"op": "send", "id": 8, "destination": b.uuid, "timestamp": 1, "messages": [copy("")]}),
        // Two copies for one device.
        json!({"op": "send", "id": 9, "destination": b.uuid, "timestamp": 1, "messages": [copy("aGk="), copy("aGk=")]}),
        // Destination not a UUID.
        json!({"op": "send", "id": 10, "destination": "bob", "timestamp": 1, "messages": [copy("aGk=")]}),
        // Negative ids are integers too.
        json!({"op": "send", "id": -3, "destination": b.uuid, "messages": []}),
        // An id beyond 2^53 must be echoed exactly.
        json!({"op": "send", "id": 9_007_199_254_740_993u64, "destination": b.uuid, "messages": []}),
    ];
    for frame in &cases {
        ws.send_json(frame).await;
        let v = ws.next_json().await;
        assert_eq!(v["op"], "response", "{frame} → {v}");
        assert_eq!(v["id"], frame["id"], "{v}");
        assert_eq!(v["status"], 400, "{frame} → {v}");
        assert_eq!(v["body"]["error"], "bad_request", "{v}");
        assert!(v["body"]["message"].is_string(), "{v}");
    }
    assert!(mailbox(&b).await.is_empty(), "a refused send was stored");
    let (r, _) = ws
        .send_and_wait(11, &b.uuid, send_body(&[b.target()], b"ok", false))
        .await;
    assert_eq!(r["status"], 200, "{r}");
}

async fn unknown_op_and_binary_frames_get_error_frames(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut ws = connect_empty(&a).await;
    let cases = [
        json!({"op": "subscribe", "id": 1}),
        json!({"id": 2}),
        json!({"op": 3, "id": 3}),
        json!({"op": "send", "id": "four"}),
        json!({"op": "send"}),
        json!({"op": "ack"}),
        json!({"op": "ack", "guid": "not-a-guid"}),
    ];
    for frame in &cases {
        ws.send_json(frame).await;
        let v = ws.next_json().await;
        assert_eq!(v["op"], "error", "{frame} → {v}");
        assert!(v["message"].is_string(), "{v}");
    }
    ws.stream
        .send(Message::Binary(vec![0x7b, 0x7d]))
        .await
        .expect("send binary");
    let v = ws.next_json().await;
    assert_eq!(v["op"], "error", "binary frame → {v}");

    let (r, _) = ws
        .send_and_wait(12, &b.uuid, send_body(&[b.target()], b"ok", false))
        .await;
    assert_eq!(r["status"], 200, "connection still usable: {r}");
}

async fn ws_send_device_set_errors_are_responses_with_lists(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b1 = TestDevice::register(&server).await;
    let b2 = b1.link().await;
    let mut ws_b = connect_empty(&b1).await;
    let mut ws = connect_empty(&a).await;

    let (r, _) = ws
        .send_and_wait(1, &b1.uuid, send_body(&[b1.target()], b"x", false))
        .await;
    assert_eq!(r["status"], 409, "{r}");
    assert_eq!(r["body"]["error"], "mismatched_devices", "{r}");
    assert_eq!(r["body"]["missingDevices"], json!([2]), "{r}");
    assert_eq!(r["body"]["extraDevices"], json!([]), "{r}");

    let copies = [b1.target(), b2.target(), (5, 5)];
    let (r, _) = ws
        .send_and_wait(2, &b1.uuid, send_body(&copies, b"x", false))
        .await;
    assert_eq!(r["status"], 409, "{r}");
    assert_eq!(r["body"]["missingDevices"], json!([]), "{r}");
    assert_eq!(r["body"]["extraDevices"], json!([5]), "{r}");

    let wrong = b1.registration_id % 16000 + 1;
    let copies = [(1, wrong), b2.target()];
    let (r, _) = ws
        .send_and_wait(3, &b1.uuid, send_body(&copies, b"x", false))
        .await;
    assert_eq!(r["status"], 410, "{r}");
    assert_eq!(r["body"]["error"], "stale_devices", "{r}");
    assert_eq!(r["body"]["staleDevices"], json!([1]), "{r}");

    let (r, _) = ws
        .send_and_wait(
            4,
            "5f0c1f8e-8d2a-4c8e-9a55-0d4c1b2a3e4f",
            send_body(&[(1, 1)], b"x", false),
        )
        .await;
    assert_eq!(r["status"], 404, "{r}");

    // Nothing from any of them reached B.
    assert_silent(&mut ws_b, Duration::from_millis(400)).await;
    assert!(mailbox(&b1).await.is_empty());
    assert!(mailbox(&b2).await.is_empty());
}

async fn oversize_content_over_ws_is_413_response(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    let b = TestDevice::register(&server).await;
    let mut ws_b = connect_empty(&b).await;
    let mut ws = connect_empty(&a).await;
    let big = vec![1u8; 256 * 1024 + 1];
    let (r, _) = ws
        .send_and_wait(1, &b.uuid, send_body(&[b.target()], &big, false))
        .await;
    assert_eq!(r["status"], 413, "{r}");
    assert_eq!(r["body"]["error"], "too_large", "{r}");
    assert_silent(&mut ws_b, Duration::from_millis(300)).await;
    assert!(mailbox(&b).await.is_empty());

    // The limit itself is fine, and the connection survived the refusal.
    let max = vec![2u8; 256 * 1024];
    ws.send_json(&send_frame(2, &b.uuid, &[b.target()], &max, false))
        .await;
    let (m, _) = ws_b.until_op("message").await;
    assert_eq!(content_of(&m["envelope"]), max);
    ws_b.ack(m["envelope"]["guid"].as_str().unwrap()).await;
    let (r, _) = ws.until_op("response").await;
    assert_eq!(r["id"], 2);
    assert_eq!(r["status"], 200, "{r}");
}

// ---- authentication of the upgrade ----

async fn connect_query(
    server: &TestServer,
    login: &str,
    password: &str,
) -> Result<Ws, tungstenite::Error> {
    let url = server.ws_url(&format!(
        "/v1/websocket?login={}&password={}",
        percent(login),
        percent(password)
    ));
    tokio_tungstenite::connect_async(url)
        .await
        .map(|(stream, _)| Ws { stream })
}

fn upgrade_status(r: Result<Ws, tungstenite::Error>) -> u16 {
    match r {
        Ok(_) => panic!("the upgrade succeeded"),
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn query_string_login_works_and_wrong_password_is_401(backend: Backend) {
    let server = TestServer::start(backend).await;
    let a = TestDevice::register(&server).await;
    // A secret full of characters that must be percent-encoded in a query.
    let password = "p@ss w&rd=+%/?#:;~!*'()[]".to_owned();
    let registration_id = 4242;
    let (status, body) = call(
        Method::POST,
        &server.url("/v1/accounts"),
        None,
        Some(&json!({"password": password, "registrationId": registration_id})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let b = TestDevice {
        base: server.url(""),
        uuid: body["uuid"].as_str().expect("uuid").to_owned(),
        device_id: 1,
        password: password.clone(),
        registration_id,
    };
    let b2 = b.link().await;

    // `UUID.DEVICE`, and `UUID` alone for device 1.
    for login in [b.login(), b.uuid.clone()] {
        let mut ws = connect_query(&server, &login, &password)
            .await
            .unwrap_or_else(|e| panic!("login {login}: {e}"));
        assert_eq!(ws.next_json().await, json!({"op": "queue-empty"}));
        // It really is device 1's session: a send to it arrives here.
        let (sender, dest, copies) = (a.clone(), b.uuid.clone(), [b.target(), b2.target()]);
        let send = tokio::spawn(async move { sender.send(&dest, &copies, b"via query").await });
        let (m, _) = ws.until_op("message").await;
        assert_envelope(
            &m["envelope"],
            m["envelope"]["guid"].as_str().unwrap(),
            &a,
            b"via query",
        );
        ws.ack(m["envelope"]["guid"].as_str().unwrap()).await;
        let (status, body) = within("send", send).await.expect("send task");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(results(&body)[&1].1, "delivered", "{body}");
        ws.close().await;
    }
    let mut ws = connect_query(&server, &b2.login(), &b2.password)
        .await
        .expect("linked device via query");
    let stored = ws.drain_queue().await;
    assert_eq!(stored.len(), 2, "b2's two queued copies: {stored:?}");
    ws.close().await;

    // Wrong password, unknown account, wrong device: 401, no upgrade.
    let wrong = connect_query(&server, &b.login(), "wrong-password-0123").await;
    assert_eq!(upgrade_status(wrong), 401);
    let other = connect_query(&server, &b2.login(), &password).await;
    assert_eq!(upgrade_status(other), 401, "b1's secret on b2");
    let nobody = connect_query(&server, "5f0c1f8e-8d2a-4c8e-9a55-0d4c1b2a3e4f.1", &password).await;
    assert_eq!(upgrade_status(nobody), 401);
    // No credentials at all is an unidentified connection (sealed sender):
    // it opens, but receives nothing, not even `queue-empty`.
    let (stream, _) = tokio_tungstenite::connect_async(server.ws_url("/v1/websocket"))
        .await
        .expect("an unidentified connection");
    let mut unidentified = Ws { stream };
    assert!(round_trip(&mut unidentified).await.is_empty());
}

/// A client's close is answered with a close frame at once (RFC 6455
/// closing handshake), not by dropping the TCP connection later.
async fn client_close_is_answered_with_a_close_frame(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let mut ws = alice.connect().await;
    ws.drain_queue().await;
    let started = std::time::Instant::now();
    futures_util::SinkExt::send(
        &mut ws.stream,
        tokio_tungstenite::tungstenite::Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "bye".into(),
            },
        )),
    )
    .await
    .unwrap();
    let answer = ws.next_within(std::time::Duration::from_secs(2)).await;
    assert!(
        matches!(answer, Some(Frame::Closed(Some(1000)))),
        "expected the server's close frame, got {answer:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(500));
}

backends!(
    client_close_is_answered_with_a_close_frame,
    live_send_to_two_devices_is_answered_after_both_acks,
    dropped_socket_before_ack_queues_and_is_pushed_again,
    unacked_copy_is_queued_after_ack_timeout_and_pushed_only_on_next_connection,
    late_ack_deletes_the_spilled_copy,
    newer_connection_closes_older_with_4409_and_keeps_unacked_copy,
    thousand_pipelined_sends_arrive_in_order,
    recipient_connecting_midway_gets_mailbox_then_live_in_order,
    a_device_replaced_midway_gets_every_copy_in_order,
    non_json_frame_gets_error_and_connection_stays_open,
    invalid_send_body_gets_400_response_with_its_id,
    unknown_op_and_binary_frames_get_error_frames,
    ws_send_device_set_errors_are_responses_with_lists,
    oversize_content_over_ws_is_413_response,
    query_string_login_works_and_wrong_password_is_401,
);
