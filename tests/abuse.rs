//! Abuse: what one hostile account can do to others is bounded by the rate
//! limits, the size limits and the output bound, and everyone else keeps
//! being served.

mod common;

use std::time::{Duration, Instant};

use common::*;
use courier::limits::Limit;
use futures_util::SinkExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn one_time_keys(ids: std::ops::RangeInclusive<u32>) -> Value {
    Value::Array(
        ids.map(|id| {
            let mut key = [0x42u8; 33];
            key[0] = 0x05;
            key[1..5].copy_from_slice(&id.to_le_bytes());
            json!({"keyId": id, "publicKey": b64(&key)})
        })
        .collect(),
    )
}

/// An attacker fetching a victim's bundle in a loop takes at most the
/// per-pair allowance of one-time keys; the rest stay for real senders.
async fn one_account_cannot_drain_another_users_one_time_keys(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits = true;
        c.limits[Limit::BundleFetchPerPair] = "5/h".parse().unwrap();
    })
    .await;
    let victim = TestDevice::register(&server).await;
    let mut upload = vectors()["valid"][0].clone();
    upload["preKeys"] = one_time_keys(1..=50);
    assert_eq!(
        victim
            .request(Method::PUT, "/v1/keys", Some(&upload))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let attacker = TestDevice::register(&server).await;
    let mut served = 0;
    let mut refused = 0;
    for i in 0..30 {
        let path = if i % 2 == 0 {
            format!("/v1/keys/{}/1", victim.uuid)
        } else {
            format!("/v1/keys/{}/*", victim.uuid)
        };
        match attacker.request(Method::GET, &path, None).await {
            (StatusCode::OK, _) => served += 1,
            (StatusCode::TOO_MANY_REQUESTS, body) => {
                assert_eq!(body["error"], "rate_limited");
                refused += 1
            }
            (s, b) => panic!("unexpected {s}: {b}"),
        }
    }
    assert_eq!((served, refused), (5, 25));
    let (_, count) = victim.request(Method::GET, "/v1/keys/count", None).await;
    // The 50 uploaded, minus the 5 the attacker got.
    assert_eq!(count["count"], 50 - 5);
    // A real sender is not affected by the attacker's exhausted allowance.
    let friend = TestDevice::register(&server).await;
    let (status, bundle) = friend
        .request(Method::GET, &format!("/v1/keys/{}/1", victim.uuid), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(bundle["devices"][0]["preKey"].is_object());
}

/// A flooding sender gets 429 and oversize sends get 413, while another
/// pair keeps exchanging messages at normal latency.
async fn floods_and_oversize_sends_do_not_starve_others(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits = true;
        c.limits[Limit::SendsPerAccount] = "20/min".parse().unwrap();
    })
    .await;
    let flooder = TestDevice::register(&server).await;
    let target = TestDevice::register(&server).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let mut bob_ws = bob.connect().await;
    bob_ws.drain_queue().await;

    let flood = {
        let flooder = flooder.clone();
        let target = target.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..60 {
                statuses.push(
                    flooder
                        .send(&target.uuid, &[target.target()], b"spam")
                        .await
                        .0,
                );
            }
            let huge = vec![7u8; 256 * 1024 + 1];
            statuses.push(
                flooder
                    .send(&target.uuid, &[target.target()], &huge)
                    .await
                    .0,
            );
            statuses
        })
    };
    // Meanwhile alice → bob, live, acked.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let sender = alice.clone();
        let (uuid, dest) = (bob.uuid.clone(), bob.target());
        let started = Instant::now();
        let answer = tokio::spawn(async move {
            sender
                .send(&uuid, &[dest], format!("hi {i}").as_bytes())
                .await
        });
        let (pushed, _) = bob_ws.until_op("message").await;
        bob_ws
            .ack(pushed["envelope"]["guid"].as_str().unwrap())
            .await;
        let (status, body) = answer.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["results"][0]["status"], "delivered");
        worst = worst.max(started.elapsed());
    }
    let statuses = flood.await.unwrap();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok, 20, "the flooder gets its allowance: {statuses:?}");
    assert_eq!(limited, 40);
    // The oversize copy is refused by size before anything else.
    assert_eq!(*statuses.last().unwrap(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        worst < Duration::from_secs(2),
        "victim pair slowed to {worst:?}"
    );
}

/// A WebSocket client that pipelines sends past its limit is answered `429`
/// for each and slowed down (the server pauses reading it), but never
/// disconnected: every send is answered, and the same connection still
/// receives and acknowledges live messages afterwards.
async fn a_rate_limited_websocket_sender_is_slowed_not_dropped(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits = true;
        c.limits[Limit::SendsPerAccount] = "5/min".parse().unwrap();
    })
    .await;
    let flooder = TestDevice::register(&server).await;
    let target = TestDevice::register(&server).await;
    let friend = TestDevice::register(&server).await;
    let mut ws = flooder.connect().await;
    ws.drain_queue().await;

    for id in 0..50u64 {
        ws.send_json(&send_frame(
            id,
            &target.uuid,
            &[target.target()],
            b"spam",
            false,
        ))
        .await;
    }
    let mut statuses = std::collections::BTreeMap::<u64, u64>::new();
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < 50 {
        let v = ws.next_json().await;
        if v["op"] == "response" {
            assert!(
                answered.insert(v["id"].as_u64().unwrap()),
                "answered twice: {v}"
            );
            *statuses.entry(v["status"].as_u64().unwrap()).or_default() += 1;
            if v["status"] == 429 {
                assert_eq!(v["body"]["error"], "rate_limited", "{v}");
            }
        }
    }
    assert_eq!(statuses.get(&200), Some(&5), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&45), "{statuses:?}");

    // Still connected, still served: a message to the flooder arrives live.
    let answer = {
        let (friend, uuid, dest) = (friend.clone(), flooder.uuid.clone(), flooder.target());
        tokio::spawn(async move { friend.send(&uuid, &[dest], b"still there?").await })
    };
    let (pushed, _) = ws.until_op("message").await;
    ws.ack(pushed["envelope"]["guid"].as_str().unwrap()).await;
    let (status, body) = answer.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["status"], "delivered", "{body}");
}

/// A body over the endpoint's limit is refused with 413 and the SPEC body,
/// before it is parsed.
async fn oversize_bodies_are_413(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let big = "x".repeat(9 * 1024 * 1024);
    let res = http()
        .put(server.url(&format!("/v1/messages/{}", alice.uuid)))
        .basic_auth(alice.login(), Some(&alice.password))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"timestamp\":1,\"messages\":[],\"pad\":\"{big}\"}}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "too_large");
    let res = http()
        .post(server.url("/v1/accounts"))
        .header("content-type", "application/json")
        .body(format!("{{\"password\":\"{}\"}}", "p".repeat(100_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

/// A sender that writes sends and never reads their answers (each refused
/// `409`, a stale device list, from the cached device set) is cut once its
/// unsent answers pass 32 MiB, long before the 60 s no-progress timeout; the
/// server's memory for it is bounded, and others are served meanwhile.
async fn a_sender_that_never_reads_its_answers_is_cut(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mallory = TestDevice::register(&server).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let mut ws = mallory.connect_small_window(4 * 1024).await;
    let frame = |id: u64| send_frame(id, &bob.uuid, &[(2, 1)], b"x", false);
    ws.send_json(&frame(0)).await;
    let (first, _) = ws.until_op("response").await;
    assert_eq!(first["status"], 409, "{first}");
    // Later ids have at most 6 more digits.
    let answer_bytes = first.to_string().len() as u64 + 6;

    let started = Instant::now();
    let mut sent = 1u64;
    let cut = loop {
        if let Err(e) = ws.stream.feed(Message::Text(frame(sent).to_string())).await {
            break e;
        }
        sent += 1;
        if sent.is_multiple_of(1000) {
            if let Err(e) = ws.stream.flush().await {
                break e;
            }
            assert!(
                started.elapsed() < Duration::from_secs(50),
                "not cut after {sent} sends"
            );
            if sent.is_multiple_of(50_000) {
                let (status, body) = alice.send(&bob.uuid, &[bob.target()], b"served").await;
                assert_eq!(status, StatusCode::OK, "{body}");
            }
        }
    };
    // Not before its answers could have reached the bound.
    assert!(
        sent * answer_bytes > 32 * 1024 * 1024,
        "cut after {sent} sends: {cut}"
    );
    let (status, body) = alice.send(&bob.uuid, &[bob.target()], b"served").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

backends!(
    a_sender_that_never_reads_its_answers_is_cut,
    one_account_cannot_drain_another_users_one_time_keys,
    floods_and_oversize_sends_do_not_starve_others,
    a_rate_limited_websocket_sender_is_slowed_not_dropped,
    oversize_bodies_are_413,
);
