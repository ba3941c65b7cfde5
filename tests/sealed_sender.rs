//! Sealed sender (SPEC "Sealed sender"): certificates that chain to the
//! trust root, account attributes, and unidentified sends over HTTP and an
//! unidentified WebSocket, with every refusal alike.

mod common;

use std::time::Duration;

use courier::domain::certificates::check_sender_certificate;
use courier::limits::Limit;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::*;

const KEY: [u8; 16] = *b"sixteen byte key";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A body of sealed-sender copies (type 6) for `copies`.
fn sealed_body(copies: &[(u32, i64)], content: &[u8]) -> Value {
    let mut body = send_body(copies, content, false);
    for m in body["messages"].as_array_mut().unwrap() {
        m["type"] = json!(6);
    }
    body
}

/// `PUT /v1/messages/{dest}` with no credentials but `Unidentified-Access-Key`.
async fn sealed_send(
    base: &str,
    dest: &str,
    key: Option<&[u8]>,
    body: &Value,
) -> (StatusCode, Value) {
    let mut req = http().put(format!("{base}/v1/messages/{dest}")).json(body);
    if let Some(key) = key {
        req = req.header("Unidentified-Access-Key", b64(key));
    }
    let res = req.send().await.expect("request");
    let status = res.status();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn set_key(device: &TestDevice, key: Option<&[u8]>, unrestricted: bool) -> StatusCode {
    let body = json!({
        "unidentifiedAccessKey": key.map(b64),
        "unrestrictedUnidentifiedAccess": unrestricted,
    });
    device
        .request(Method::PUT, "/v1/accounts/attributes", Some(&body))
        .await
        .0
}

async fn certificates_chain_to_the_trust_root(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;

    // No identity key yet: nothing to certify.
    let (status, body) = alice
        .request(Method::GET, "/v1/certificate/delivery", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "no_identity_key");

    assert_eq!(alice.upload_vector(0).await, StatusCode::NO_CONTENT);
    let linked = alice.link().await;
    let (status, root) = call(
        Method::GET,
        &server.url("/v1/certificate/trust-root"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let root: [u8; 33] = unb64(root["publicKey"].as_str().unwrap())
        .try_into()
        .unwrap();
    assert_eq!(root[0], 0x05);

    let identity = unb64(vectors()["valid"][0]["identityKey"].as_str().unwrap());
    for device in [&alice, &linked] {
        let (status, body) = device
            .request(Method::GET, "/v1/certificate/delivery", None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let cert = unb64(body["certificate"].as_str().unwrap());
        let sender = check_sender_certificate(&cert, &root, now_ms()).expect("valid certificate");
        assert_eq!(sender.account.to_string(), device.uuid);
        assert_eq!(sender.device, device.device_id);
        assert_eq!(sender.identity_key.as_slice(), identity.as_slice());
        // 24 hours by default.
        let left = sender.expires - now_ms();
        assert!((23 * 3_600_000..=24 * 3_600_000).contains(&left), "{left}");
        // Not valid after it expires, nor against another root.
        assert!(check_sender_certificate(&cert, &root, sender.expires + 1).is_err());
        let mut other = root;
        other[5] ^= 1;
        assert!(check_sender_certificate(&cert, &other, now_ms()).is_err());
    }

    let (status, _) = call(
        Method::GET,
        &server.url("/v1/certificate/delivery"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn attributes_are_the_primarys_to_set(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let linked = alice.link().await;
    assert_eq!(
        set_key(&linked, Some(&KEY), false).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        set_key(&alice, Some(&KEY[..15]), false).await,
        StatusCode::BAD_REQUEST
    );
    let (status, _) = alice
        .request(
            Method::PUT,
            "/v1/accounts/attributes",
            Some(&json!({"unidentifiedAccessKey": "not base64!"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        set_key(&alice, Some(&KEY), false).await,
        StatusCode::NO_CONTENT
    );
    let body = sealed_body(&[alice.target(), linked.target()], b"sealed");
    let (status, _) = sealed_send(&alice.base, &alice.uuid, Some(&KEY), &body).await;
    assert_eq!(status, StatusCode::OK);
    // `null` removes the key: nobody may send unidentified any more.
    assert_eq!(set_key(&alice, None, false).await, StatusCode::NO_CONTENT);
    let (status, _) = sealed_send(&alice.base, &alice.uuid, Some(&KEY), &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn a_sealed_send_names_no_sender(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob = TestDevice::register(&server).await;
    let bob2 = bob.link().await;
    assert_eq!(
        set_key(&bob, Some(&KEY), false).await,
        StatusCode::NO_CONTENT
    );

    // bob is connected, bob2 is not: one copy pushed live, one stored.
    let mut ws = connect_empty(&bob).await;
    let body = sealed_body(&[bob.target(), bob2.target()], b"sealed content");
    let send = tokio::spawn({
        let base = server.url("");
        let dest = bob.uuid.clone();
        async move { sealed_send(&base, &dest, Some(&KEY), &body).await }
    });
    let (pushed, _) = ws.until_op("message").await;
    let envelope = &pushed["envelope"];
    assert!(envelope.get("source").is_none(), "{envelope}");
    assert!(envelope.get("sourceDevice").is_none(), "{envelope}");
    assert_eq!(envelope["type"], 6);
    assert_eq!(content_of(envelope), b"sealed content");
    ws.ack(envelope["guid"].as_str().unwrap()).await;
    let (status, answer) = send.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = results(&answer);
    assert_eq!(results[&u64::from(bob.device_id)].1, "delivered");
    assert_eq!(results[&u64::from(bob2.device_id)].1, "queued");

    let stored = mailbox(&bob2).await;
    assert_eq!(stored.len(), 1);
    assert!(stored[0].get("source").is_none(), "{}", stored[0]);
    assert_eq!(stored[0]["type"], 6);
    assert_eq!(content_of(&stored[0]), b"sealed content");
    // Replayed over a WebSocket, still without a sender.
    let mut ws2 = bob2.connect().await;
    let replayed = ws2.drain_queue().await;
    assert_eq!(replayed.len(), 1);
    assert!(replayed[0].get("source").is_none());
}

async fn unidentified_refusals_are_alike(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob = TestDevice::register(&server).await;
    assert_eq!(
        set_key(&bob, Some(&KEY), false).await,
        StatusCode::NO_CONTENT
    );
    let carol = TestDevice::register(&server).await; // no key at all
    let body = sealed_body(&[bob.target()], b"x");
    let base = server.url("");

    let unknown = uuid::Uuid::new_v4().to_string();
    let mut refusals = Vec::new();
    for (dest, key) in [
        (bob.uuid.as_str(), Some(&b"wrong key 16 byt"[..])),
        (bob.uuid.as_str(), None),
        (unknown.as_str(), Some(&KEY[..])),
        (carol.uuid.as_str(), Some(&KEY[..])),
        (bob.uuid.as_str(), Some(&KEY[..8])),
    ] {
        let (status, body) = sealed_send(&base, dest, key, &body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{dest} {body}");
        refusals.push(body);
    }
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");

    // Only sealed-sender copies.
    let mut typed = body.clone();
    typed["messages"][0]["type"] = json!(1);
    let (status, answer) = sealed_send(&base, &bob.uuid, Some(&KEY), &typed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    // Credentials and an access key at once.
    let res = http()
        .put(format!("{base}/v1/messages/{}", bob.uuid))
        .basic_auth(carol.login(), Some(&carol.password))
        .header("Unidentified-Access-Key", b64(&KEY))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // A stale device set is still a 409 with the devices named.
    let bob2 = bob.link().await;
    let (status, answer) = sealed_send(&base, &bob.uuid, Some(&KEY), &body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["missingDevices"], json!([bob2.device_id]));
    // An account open to anyone takes any key.
    assert_eq!(set_key(&carol, None, true).await, StatusCode::NO_CONTENT);
    let open = sealed_body(&[carol.target()], b"y");
    let (status, _) = sealed_send(&base, &carol.uuid, Some(&[7; 16]), &open).await;
    assert_eq!(status, StatusCode::OK);
}

async fn an_unidentified_websocket_only_sends(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob = TestDevice::register(&server).await;
    assert_eq!(
        set_key(&bob, Some(&KEY), false).await,
        StatusCode::NO_CONTENT
    );
    let mut bob_ws = connect_empty(&bob).await;
    let mut ws = Ws::unidentified(&server.url("")).await;

    let mut frame = send_frame(1, &bob.uuid, &[bob.target()], b"over ws", false);
    frame["messages"][0]["type"] = json!(6);
    frame["unidentifiedAccessKey"] = json!(b64(&KEY));
    ws.send_json(&frame).await;
    let (pushed, _) = bob_ws.until_op("message").await;
    assert!(pushed["envelope"].get("source").is_none(), "{pushed}");
    bob_ws
        .ack(pushed["envelope"]["guid"].as_str().unwrap())
        .await;
    let (answer, others) = ws.until_op("response").await;
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(answer["id"], 1);
    assert_eq!(answer["status"], 200, "{answer}");

    // No key, a wrong key: 401 responses; the connection stays open.
    let mut keyless = frame.clone();
    keyless["id"] = json!(2);
    keyless
        .as_object_mut()
        .unwrap()
        .remove("unidentifiedAccessKey");
    ws.send_json(&keyless).await;
    let (answer, _) = ws.until_op("response").await;
    assert_eq!(
        (answer["id"].clone(), answer["status"].clone()),
        (json!(2), json!(401))
    );
    let mut wrong = frame.clone();
    wrong["id"] = json!(3);
    wrong["unidentifiedAccessKey"] = json!(b64(&[0; 16]));
    ws.send_json(&wrong).await;
    let (answer, _) = ws.until_op("response").await;
    assert_eq!(
        (answer["id"].clone(), answer["status"].clone()),
        (json!(3), json!(401))
    );
    // Nothing to acknowledge, and never a queue-empty or a message.
    ws.send_json(&json!({"op": "ack", "guid": uuid::Uuid::new_v4()}))
        .await;
    let (error, _) = ws.until_op("error").await;
    assert!(
        error["message"].as_str().unwrap().contains("unidentified"),
        "{error}"
    );
    assert_silent(&mut ws, Duration::from_millis(300)).await;

    // The device's own connection refuses to carry a sealed send.
    bob_ws.send_json(&frame).await;
    let (answer, _) = bob_ws.until_op("response").await;
    assert_eq!(answer["status"], 400, "{answer}");
    // Wrong credentials are still refused before the upgrade.
    let url = server.url("/v1/websocket").replacen("http://", "ws://", 1)
        + "?login=nobody&password=wrong-password-123";
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
}

async fn unidentified_sends_are_limited_per_destination(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits = true;
        c.limits[Limit::UnidentifiedSendPerDestination] = "3/h".parse().unwrap();
    })
    .await;
    let bob = TestDevice::register(&server).await;
    let carol = TestDevice::register(&server).await;
    for d in [&bob, &carol] {
        assert_eq!(set_key(d, Some(&KEY), false).await, StatusCode::NO_CONTENT);
    }
    let base = server.url("");
    let to_bob = sealed_body(&[bob.target()], b"x");
    for _ in 0..3 {
        let (status, _) = sealed_send(&base, &bob.uuid, Some(&KEY), &to_bob).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = sealed_send(&base, &bob.uuid, Some(&KEY), &to_bob).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body["retryAfter"].as_u64().unwrap() >= 1);
    // Another destination has its own budget.
    let to_carol = sealed_body(&[carol.target()], b"y");
    let (status, _) = sealed_send(&base, &carol.uuid, Some(&KEY), &to_carol).await;
    assert_eq!(status, StatusCode::OK);
}

async fn unidentified_connections_are_limited_per_address(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits = true;
        c.limits[Limit::UnidentifiedConnectPerIp] = "2/h".parse().unwrap();
    })
    .await;
    let first = Ws::unidentified(&server.url("")).await;
    let second = Ws::unidentified(&server.url("")).await;
    let url = server.url("/v1/websocket").replacen("http://", "ws://", 1);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // A device's own connection does not count against it.
    let bob = TestDevice::register(&server).await;
    connect_empty(&bob).await;
    drop((first, second));
}

backends!(
    unidentified_connections_are_limited_per_address,
    certificates_chain_to_the_trust_root,
    attributes_are_the_primarys_to_set,
    a_sealed_send_names_no_sender,
    unidentified_refusals_are_alike,
    an_unidentified_websocket_only_sends,
    unidentified_sends_are_limited_per_destination,
);
