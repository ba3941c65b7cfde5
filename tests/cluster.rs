//! A cluster: three real courier servers on one PostgreSQL database and one
//! Redis (SPEC.md, "Cluster"). Every rule of the contract must hold
//! whichever node a client talks to. Skipped (with a note) unless both
//! `COURIER_TEST_POSTGRES_URL` and `COURIER_TEST_REDIS_URL` are set.

mod common;

use std::time::Duration;

use common::cluster::{cluster_available, TestCluster};
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// `d` talking to node `base` instead.
fn at(d: &TestDevice, node: &TestServer) -> TestDevice {
    TestDevice {
        base: node.url(""),
        ..d.clone()
    }
}

async fn three_nodes() -> Option<TestCluster> {
    if !cluster_available() {
        return None;
    }
    Some(TestCluster::start(3, |_| {}).await)
}

/// Sends through node 1 to a device connected to node 2 are pushed at once,
/// in order, and answered `delivered` after that device's acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_sends_are_delivered_live_in_order() {
    let Some(c) = three_nodes().await else { return };
    let sender = TestDevice::register(&c.nodes[0]).await;
    let receiver = TestDevice::register(&c.nodes[0]).await;
    let mut rx = connect_empty(&at(&receiver, &c.nodes[1])).await;
    let mut tx = sender.connect().await;
    tx.drain_queue().await;

    const N: u64 = 50;
    for i in 0..N {
        tx.send_json(&send_frame(
            i,
            &receiver.uuid,
            &[receiver.target()],
            format!("m{i}").as_bytes(),
            false,
        ))
        .await;
    }
    // Every copy is pushed live, in send order; ack each.
    for i in 0..N {
        let v = rx.next_json().await;
        assert_eq!(v["op"], "message", "{v}");
        assert_eq!(content_of(&v["envelope"]), format!("m{i}").as_bytes());
        assert_eq!(v["envelope"]["source"], sender.uuid.as_str());
        rx.ack(v["envelope"]["guid"].as_str().unwrap()).await;
    }
    let mut answered = 0;
    while answered < N {
        let v = tx.next_json().await;
        if v["op"] != "response" {
            continue;
        }
        assert_eq!(v["status"], 200, "{v}");
        assert_eq!(v["body"]["results"][0]["status"], "delivered", "{v}");
        answered += 1;
    }
    // Nothing was stored on the way.
    assert!(mailbox(&at(&receiver, &c.nodes[2])).await.is_empty());
    let metrics = reqwest::get(c.nodes[0].url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("courier_cluster_forwards_total {N}")),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("courier_cluster_confirmations_total {N}")));
    assert!(metrics.contains("courier_cluster_fallback_spills_total 0"));
}

/// One send fans out to two devices of one account, each connected to a
/// different other node; both are pushed live and the send answered
/// `delivered` for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_send_fans_out_to_devices_on_two_other_nodes() {
    let Some(c) = three_nodes().await else { return };
    let sender = TestDevice::register(&c.nodes[0]).await;
    let primary = TestDevice::register(&c.nodes[0]).await;
    let linked = primary.link().await;
    let mut on1 = connect_empty(&at(&primary, &c.nodes[1])).await;
    let mut on2 = connect_empty(&at(&linked, &c.nodes[2])).await;

    let send = {
        let (sender, primary, linked) = (sender.clone(), primary.clone(), linked.clone());
        tokio::spawn(async move {
            sender
                .send(
                    &primary.uuid,
                    &[primary.target(), linked.target()],
                    b"to both",
                )
                .await
        })
    };
    for ws in [&mut on1, &mut on2] {
        let v = ws.next_json().await;
        assert_eq!(v["op"], "message", "{v}");
        assert_eq!(content_of(&v["envelope"]), b"to both");
        ws.ack(v["envelope"]["guid"].as_str().unwrap()).await;
    }
    let (status, body) = within("the fanned-out send", send).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = results(&body);
    assert_eq!(results.len(), 2, "{body}");
    for (_, (_, status)) in results {
        assert_eq!(status, "delivered", "{body}");
    }
}

/// A newer connection on one node closes the older one on another with
/// 4409 before it replays the mailbox, and what the older one held unacked
/// is replayed to the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_on_another_node_closes_the_older_with_4409() {
    let Some(c) = three_nodes().await else { return };
    let sender = TestDevice::register(&c.nodes[0]).await;
    let receiver = TestDevice::register(&c.nodes[0]).await;
    let mut old = connect_empty(&at(&receiver, &c.nodes[1])).await;

    // A copy pushed to the old connection and never acked.
    let send = {
        let (sender, receiver) = (sender.clone(), receiver.clone());
        tokio::spawn(async move {
            sender
                .send(&receiver.uuid, &[receiver.target()], b"held")
                .await
        })
    };
    let v = old.next_json().await;
    assert_eq!(v["op"], "message", "{v}");
    let guid = v["envelope"]["guid"].as_str().unwrap().to_owned();

    let mut new = at(&receiver, &c.nodes[2]).connect().await;
    assert_eq!(old.closed().await, Some(4409));
    // The newer connection gets the held copy from the mailbox, then
    // queue-empty.
    let replayed = new.drain_queue().await;
    assert_eq!(guids(&replayed), vec![guid.clone()], "{replayed:?}");
    new.ack(&guid).await;
    let (status, body) = within("the held send", send).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["status"], "queued", "{body}");

    // Sends now go live to the newer connection, from any node.
    let send = {
        let (sender, receiver) = (at(&sender, &c.nodes[1]), receiver.clone());
        tokio::spawn(async move {
            sender
                .send(&receiver.uuid, &[receiver.target()], b"after")
                .await
        })
    };
    let v = new.next_json().await;
    assert_eq!(content_of(&v["envelope"]), b"after");
    new.ack(v["envelope"]["guid"].as_str().unwrap()).await;
    let (_, body) = within("the send after", send).await.unwrap();
    assert_eq!(body["results"][0]["status"], "delivered", "{body}");
}

/// A device deleted through one node is refused by every node from the
/// moment the delete is answered, and its socket on another node is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_deleted_through_one_node_is_refused_everywhere_at_once() {
    let Some(c) = three_nodes().await else { return };
    let primary = TestDevice::register(&c.nodes[0]).await;
    let linked = primary.link().await;
    // Every node has seen (and cached) the linked device's credentials.
    for node in &c.nodes {
        let (status, _) = at(&linked, node)
            .request(Method::GET, "/v1/devices", None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut socket = connect_empty(&at(&linked, &c.nodes[1])).await;

    let (status, body) = primary
        .request(
            Method::DELETE,
            &format!("/v1/devices/{}", linked.device_id),
            None,
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
    for node in &c.nodes {
        let (status, _) = at(&linked, node)
            .request(Method::GET, "/v1/devices", None)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "node {}", node.addr);
    }
    assert_eq!(socket.closed().await, Some(4401));

    // The whole account, deleted through node 3: refused by nodes 1 and 2.
    for node in &c.nodes {
        let (status, _) = at(&primary, node)
            .request(Method::GET, "/v1/devices", None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut socket = connect_empty(&at(&primary, &c.nodes[0])).await;
    let (status, _) = at(&primary, &c.nodes[2])
        .request(Method::DELETE, "/v1/accounts/me", None)
        .await;
    assert!(status.is_success());
    for node in &c.nodes {
        let (status, _) = at(&primary, node)
            .request(Method::GET, "/v1/devices", None)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "node {}", node.addr);
    }
    assert_eq!(socket.closed().await, Some(4401));
}

/// A device linked through one node is in every node's device-set check at
/// once: a send through another node that leaves it out is refused `409`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_linked_through_one_node_is_seen_by_every_device_set_check() {
    let Some(c) = three_nodes().await else { return };
    let sender = TestDevice::register(&c.nodes[0]).await;
    let receiver = TestDevice::register(&c.nodes[0]).await;
    // Nodes 2 and 3 cache the one-device set.
    for node in &c.nodes[1..] {
        let (status, body) = at(&sender, node)
            .send(&receiver.uuid, &[receiver.target()], b"before")
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let linked = at(&receiver, &c.nodes[0]).link().await;
    for node in &c.nodes {
        let (status, body) = at(&sender, node)
            .send(&receiver.uuid, &[receiver.target()], b"stale set")
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "node {}: {body}", node.addr);
        assert_eq!(body["missingDevices"], json!([linked.device_id]), "{body}");
    }
    let (status, body) = at(&sender, &c.nodes[2])
        .send(
            &receiver.uuid,
            &[receiver.target(), linked.target()],
            b"both",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A rate limit is the cluster's: a budget of 6 bundle fetches of one
/// account by another is spent across three nodes, not per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_per_cluster() {
    if !cluster_available() {
        return;
    }
    let c = TestCluster::start(3, |config| {
        config.rate_limits = true;
        config.limits[courier::limits::Limit::BundleFetchPerPair] =
            courier::config::Rate::new(6, Duration::from_secs(3600));
    })
    .await;
    let fetcher = TestDevice::register(&c.nodes[0]).await;
    let target = TestDevice::register(&c.nodes[1]).await;
    assert!(target.upload_vector(0).await.is_success());
    let mut answers = Vec::new();
    for i in 0..9 {
        let node = &c.nodes[i % 3];
        let (status, _) = at(&fetcher, node)
            .request(Method::GET, &format!("/v1/keys/{}/*", target.uuid), None)
            .await;
        answers.push(status.as_u16());
    }
    assert_eq!(
        answers,
        [200, 200, 200, 200, 200, 200, 429, 429, 429],
        "{answers:?}"
    );
}

/// Redis with SQLite is refused at start (exit 78, EX_CONFIG): a cluster's
/// nodes share one PostgreSQL database.
#[test]
fn redis_with_sqlite_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("serve")
        .env_clear()
        .env("COURIER_BIND", "127.0.0.1:0")
        .env("COURIER_DATABASE_URL", dir.path().join("c.db"))
        .env("COURIER_REDIS_URL", "redis://127.0.0.1:6379/0")
        .output()
        .expect("run courier");
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
}

/// `/readyz` of a member says whether it can reach the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_of_a_member_is_ready_while_redis_answers() {
    let Some(c) = three_nodes().await else { return };
    for node in &c.nodes {
        let r = reqwest::get(node.url("/readyz")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "ready");
    }
}

/// Redis stops: a send through node 1 to a device connected to node 2 is
/// still accepted and stored (`queued`), node 1 says it is not ready; when
/// Redis is back (empty), node 2 re-announces its connection and pushes
/// the copy stored meanwhile to the device without a reconnection, and
/// cross-node sends are live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_outage_copies_stored_meanwhile_reach_the_live_connection() {
    if !cluster_available() {
        return;
    }
    let Some(mut redis) = common::cluster::PrivateRedis::start() else {
        return;
    };
    let db = Database::fresh(Backend::Postgres);
    let name = common::cluster::unique_cluster_name();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let config = common::cluster::node_config(&db, &redis.url(), &name, &|_| {});
        nodes.push(TestServer::launch_node(config).await);
    }
    let sender = TestDevice::register(&nodes[0]).await;
    let receiver = TestDevice::register(&nodes[0]).await;
    let mut rx = connect_empty(&at(&receiver, &nodes[1])).await;

    redis.stop();
    let ready = || async {
        reqwest::get(nodes[0].url("/readyz"))
            .await
            .unwrap()
            .status()
    };
    within("readyz 503 without Redis", async {
        while ready().await != StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (status, body) = sender
        .send(&receiver.uuid, &[receiver.target()], b"during the outage")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["status"], "queued", "{body}");

    redis.restart();
    // The node re-subscribes (backing off up to 2 s), re-announces its
    // connections, and they rescan: allow for a loaded machine.
    let v = match rx.next_within(Duration::from_secs(30)).await {
        Some(Frame::Json(v)) => v,
        other => panic!("the stored copy was not pushed live: {other:?}"),
    };
    assert_eq!(v["op"], "message", "{v}");
    assert_eq!(content_of(&v["envelope"]), b"during the outage");
    rx.ack(v["envelope"]["guid"].as_str().unwrap()).await;
    within("readyz 200 again", async {
        while ready().await != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Live across nodes again (node 2's presence was announced anew).
    let send = {
        let (sender, receiver) = (sender.clone(), receiver.clone());
        tokio::spawn(async move {
            sender
                .send(&receiver.uuid, &[receiver.target()], b"after the outage")
                .await
        })
    };
    let v = rx.next_json().await;
    assert_eq!(content_of(&v["envelope"]), b"after the outage");
    rx.ack(v["envelope"]["guid"].as_str().unwrap()).await;
    let (_, body) = within("the send after", send).await.unwrap();
    assert_eq!(body["results"][0]["status"], "delivered", "{body}");
    mailbox_empties(&at(&receiver, &nodes[0])).await;
}

/// Sealed sender across nodes: an unidentified send through node 1 to a
/// device connected to node 2 is pushed there without a sender, and a
/// multi-recipient send through node 3 reaches devices on nodes 1 and 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_sends_cross_nodes_without_a_sender() {
    let Some(c) = three_nodes().await else { return };
    let key = [0x42u8; 16];
    let bob = TestDevice::register(&c.nodes[0]).await;
    let carol = TestDevice::register(&c.nodes[0]).await;
    for d in [&bob, &carol] {
        let body = json!({"unidentifiedAccessKey": b64(&key)});
        let (status, _) = d
            .request(Method::PUT, "/v1/accounts/attributes", Some(&body))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let mut bob_ws = connect_empty(&at(&bob, &c.nodes[1])).await;
    let mut carol_ws = connect_empty(&at(&carol, &c.nodes[0])).await;

    let mut body = send_body(&[bob.target()], b"sealed across nodes", false);
    body["messages"][0]["type"] = json!(6);
    let send = tokio::spawn({
        let url = c.nodes[0].url(&format!("/v1/messages/{}", bob.uuid));
        async move {
            let res = http()
                .put(url)
                .header("Unidentified-Access-Key", b64(&key))
                .json(&body)
                .send()
                .await
                .unwrap();
            (res.status(), res.json::<Value>().await.unwrap())
        }
    });
    let (pushed, _) = bob_ws.until_op("message").await;
    assert!(pushed["envelope"].get("source").is_none(), "{pushed}");
    assert_eq!(content_of(&pushed["envelope"]), b"sealed across nodes");
    bob_ws
        .ack(pushed["envelope"]["guid"].as_str().unwrap())
        .await;
    let (status, answer) = send.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(results(&answer)[&1].1, "delivered");

    // Multi-recipient through node 3: a 0x23 body for bob.1 and carol.1.
    let mut mrm = vec![0x23, 2];
    for (d, fill) in [(&bob, 0xb0u8), (&carol, 0xc0)] {
        mrm.push(0x00);
        mrm.extend_from_slice(uuid::Uuid::parse_str(&d.uuid).unwrap().as_bytes());
        mrm.push(1);
        mrm.extend_from_slice(&(d.registration_id as u16).to_be_bytes());
        mrm.extend_from_slice(&[fill; 48]);
    }
    let shared = [[0xe5u8; 32].as_slice(), b"shared ciphertext and tag"].concat();
    mrm.extend_from_slice(&shared);
    let send = tokio::spawn({
        let url = c.nodes[2].url("/v1/messages/multi_recipient?ts=5&online=false");
        async move {
            let res = http()
                .put(url)
                .header("Content-Type", "application/vnd.signal-messenger.mrm")
                .header("Unidentified-Access-Key", b64(&[0; 16])) // 0x42 ^ 0x42
                .body(mrm)
                .send()
                .await
                .unwrap();
            res.status()
        }
    });
    for (ws, fill) in [(&mut bob_ws, 0xb0u8), (&mut carol_ws, 0xc0)] {
        let (pushed, _) = ws.until_op("message").await;
        let envelope = &pushed["envelope"];
        assert!(envelope.get("source").is_none(), "{envelope}");
        let expected = [&[0x22][..], &[fill; 48], &shared].concat();
        assert_eq!(content_of(envelope), expected);
        ws.ack(envelope["guid"].as_str().unwrap()).await;
    }
    assert_eq!(send.await.unwrap(), StatusCode::OK);
}
