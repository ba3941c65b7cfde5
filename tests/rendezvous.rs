//! Rendezvous (SPEC "Rendezvous"): two accounts run SPAKE2 through courier
//! and pass an identity key sealed under the agreed key; held frames and
//! their order; the two-side limit; unknown and expired channels;
//! `peer-left`; the frame and held-frame bounds; rate limits; auth.
//! Real servers, real sockets, both backends.

mod common;

use std::time::Duration;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::ChaCha20Poly1305;
use common::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const MAX_FRAME: usize = 64 * 1024;
const MAX_HELD: usize = 16;

/// What a side receives.
#[derive(Debug, PartialEq)]
enum Got {
    Text(Value),
    Binary(Vec<u8>),
    Closed(Option<u16>),
}

/// `POST /v1/rendezvous` as `d`: `(status, body)`.
async fn create(d: &TestDevice) -> (StatusCode, Value) {
    d.request(Method::POST, "/v1/rendezvous", None).await
}

/// A new channel's id, asserting `201` and the body's shape.
async fn channel(d: &TestDevice) -> String {
    let (status, body) = create(d).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["channel"].as_str().expect("channel").to_owned();
    assert!(
        id.len() == 8 && id.bytes().all(|b| b.is_ascii_digit()),
        "{id}"
    );
    assert!(body["expiresAt"].as_i64().expect("expiresAt") > 0, "{body}");
    id
}

/// `GET /v1/rendezvous/{channel}` as `d` (HTTP Basic): the socket, or the
/// status and body the upgrade was refused with.
async fn try_join(d: &TestDevice, channel: &str) -> Result<Socket, (u16, Value)> {
    let url = d.base.replacen("http://", "ws://", 1) + "/v1/rendezvous/" + channel;
    let mut req = url.into_client_request().expect("ws request");
    let token = b64(format!("{}:{}", d.login(), d.password).as_bytes());
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Basic {token}")).expect("header"),
    );
    refused_or(tokio_tungstenite::connect_async(req).await)
}

fn refused_or(
    result: Result<(Socket, tungstenite::handshake::client::Response), tungstenite::Error>,
) -> Result<Socket, (u16, Value)> {
    match result {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(res)) => {
            let body = res
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((res.status().as_u16(), body))
        }
        Err(e) => panic!("join failed: {e}"),
    }
}

/// The status and body of a refused join.
fn refused(joined: Result<Socket, (u16, Value)>) -> (u16, Value) {
    match joined {
        Ok(_) => panic!("the join was not refused"),
        Err(refusal) => refusal,
    }
}

async fn join(d: &TestDevice, channel: &str) -> Socket {
    try_join(d, channel)
        .await
        .unwrap_or_else(|(status, body)| panic!("join refused: {status} {body}"))
}

/// The next frame, skipping pings; panics after 10 s.
async fn next(ws: &mut Socket) -> Got {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("nothing arrived within 10 s");
        match msg {
            None | Some(Err(_)) => return Got::Closed(None),
            Some(Ok(Message::Text(t))) => {
                return Got::Text(serde_json::from_str(&t).expect("server text is JSON"))
            }
            Some(Ok(Message::Binary(b))) => return Got::Binary(b),
            Some(Ok(Message::Close(c))) => return Got::Closed(c.map(|c| u16::from(c.code))),
            Some(Ok(_)) => continue,
        }
    }
}

async fn expect_op(ws: &mut Socket, op: &str) {
    assert_eq!(next(ws).await, Got::Text(json!({ "op": op })));
}

async fn expect_binary(ws: &mut Socket) -> Vec<u8> {
    match next(ws).await {
        Got::Binary(b) => b,
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

/// Reads until the server closes; returns the close code.
async fn expect_closed(ws: &mut Socket) -> Option<u16> {
    loop {
        if let Got::Closed(code) = next(ws).await {
            return code;
        }
    }
}

async fn send(ws: &mut Socket, bytes: Vec<u8>) {
    ws.send(Message::Binary(bytes)).await.expect("ws send");
}

/// Waits (bounded) until joining `channel` is `404`: the channel is gone.
/// Nothing tells a client when the server has freed it, so this polls.
async fn until_gone(d: &TestDevice, channel: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match try_join(d, channel).await {
            Err((404, body)) => {
                assert_eq!(body["error"], "not_found", "{body}");
                return;
            }
            Err((409, _)) => {}
            Err(other) => panic!("unexpected refusal {other:?}"),
            Ok(_) => panic!("joined a channel that should be gone"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "channel still there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(server: &TestServer, name: &str) -> i64 {
    let text = http()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("courier_{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .trim()
        .parse()
        .expect("a number")
}

// ---- the PAKE, as a client would run it ----

/// The AEAD key both sides derive from the SPAKE2 output.
fn seal_key(spake_key: &[u8]) -> ChaCha20Poly1305 {
    let mut okm = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(None, spake_key)
        .expand(b"courier rendezvous test: identity key seal", &mut okm)
        .expect("32 bytes is a valid HKDF length");
    ChaCha20Poly1305::new(&okm.into())
}

/// nonce ‖ ciphertext of `plain` under `key`.
fn seal(key: &ChaCha20Poly1305, plain: &[u8]) -> Vec<u8> {
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut out = nonce.to_vec();
    out.extend(key.encrypt(&nonce, plain).expect("seal"));
    out
}

fn open(key: &ChaCha20Poly1305, sealed: &[u8]) -> Option<Vec<u8>> {
    let (nonce, ciphertext) = sealed.split_at(12);
    key.decrypt(chacha20poly1305::Nonce::from_slice(nonce), ciphertext)
        .ok()
}

fn identity_key(index: usize) -> Vec<u8> {
    unb64(
        vectors()["valid"][index]["identityKey"]
            .as_str()
            .expect("identityKey"),
    )
}

/// Alice opens a channel and sends her SPAKE2 message before Bob is there;
/// Bob joins (her message was held for him), answers with his message and
/// his identity key sealed under the agreed key; Alice answers with hers.
/// Returns what each side opened of the other's sealed key, and the keys.
async fn run_pake(
    server: &TestServer,
    alice_code: &str,
    bob_code: &str,
) -> (Option<Vec<u8>>, Option<Vec<u8>>, Vec<u8>, Vec<u8>) {
    run_pake_across(server, server, alice_code, bob_code).await
}

/// [`run_pake`] with Alice on `alice_node` (which holds the channel) and Bob
/// on `bob_node`.
async fn run_pake_across(
    alice_node: &TestServer,
    bob_node: &TestServer,
    alice_code: &str,
    bob_code: &str,
) -> (Option<Vec<u8>>, Option<Vec<u8>>, Vec<u8>, Vec<u8>) {
    let alice = TestDevice::register(alice_node).await;
    let bob = TestDevice::register(bob_node).await;
    let (id_a, id_b) = (Identity::new(b"alice"), Identity::new(b"bob"));
    let channel = channel(&alice).await;

    let mut a = join(&alice, &channel).await;
    let (a_state, a_msg) =
        Spake2::<Ed25519Group>::start_a(&Password::new(alice_code.as_bytes()), &id_a, &id_b);
    send(&mut a, a_msg).await;

    let mut b = join(&bob, &channel).await;
    expect_op(&mut b, "peer-joined").await;
    let from_alice = expect_binary(&mut b).await;
    let (b_state, b_msg) =
        Spake2::<Ed25519Group>::start_b(&Password::new(bob_code.as_bytes()), &id_a, &id_b);
    let b_key = b_state.finish(&from_alice).expect("bob finishes");
    send(&mut b, b_msg).await;
    send(&mut b, seal(&seal_key(&b_key), &identity_key(1))).await;

    expect_op(&mut a, "peer-joined").await;
    let from_bob = expect_binary(&mut a).await;
    let a_key = a_state.finish(&from_bob).expect("alice finishes");
    let bob_sealed = expect_binary(&mut a).await;
    let alice_opened = open(&seal_key(&a_key), &bob_sealed);
    send(&mut a, seal(&seal_key(&a_key), &identity_key(0))).await;
    let alice_sealed = expect_binary(&mut b).await;
    let bob_opened = open(&seal_key(&b_key), &alice_sealed);

    a.close(None).await.expect("close");
    expect_op(&mut b, "peer-left").await;
    b.close(None).await.expect("close");
    until_gone(&alice, &channel).await;
    (alice_opened, bob_opened, a_key, b_key)
}

async fn spake2_agrees_a_key_and_passes_identity_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_opened, bob_opened, a_key, b_key) = run_pake(&server, "042917", "042917").await;
    assert_eq!(a_key, b_key, "both sides derive the same key");
    assert_eq!(alice_opened, Some(identity_key(1)), "alice has bob's key");
    assert_eq!(bob_opened, Some(identity_key(0)), "bob has alice's key");
    // Alice's SPAKE2 message (held, then passed), Bob's message and sealed
    // key, Alice's sealed key.
    assert_eq!(metric(&server, "rendezvous_frames_relayed_total").await, 4);
    assert_eq!(metric(&server, "rendezvous_channels_open").await, 0);
}

async fn a_wrong_code_yields_different_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_opened, bob_opened, a_key, b_key) = run_pake(&server, "042917", "042918").await;
    assert_ne!(a_key, b_key);
    assert_eq!(alice_opened, None, "bob's seal must not open");
    assert_eq!(bob_opened, None, "alice's seal must not open");
}

// ---- across cluster nodes ----

/// In a cluster the channel lives on the node that created it; a side on
/// another node joins it there. SPAKE2 agrees a key across two nodes, a
/// wrong code does not; frames are held and passed in order across nodes; a
/// third side on yet another node is refused 409, an unknown channel 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sides_on_different_cluster_nodes_meet() {
    if !common::cluster::cluster_available() {
        return;
    }
    let c = common::cluster::TestCluster::start(3, |_| {}).await;
    let (alice_opened, bob_opened, a_key, b_key) =
        run_pake_across(&c.nodes[0], &c.nodes[1], "042917", "042917").await;
    assert_eq!(a_key, b_key, "both sides derive the same key");
    assert_eq!(alice_opened, Some(identity_key(1)));
    assert_eq!(bob_opened, Some(identity_key(0)));
    let (_, _, a_key, b_key) = run_pake_across(&c.nodes[1], &c.nodes[2], "042917", "042918").await;
    assert_ne!(a_key, b_key);

    let alice = TestDevice::register(&c.nodes[0]).await;
    let at = |node: usize| TestDevice {
        base: c.nodes[node].url(""),
        ..alice.clone()
    };
    let channel = channel(&alice).await;
    // Both sides elsewhere than the channel's node: frames held for the
    // absent side cross the bus twice, in order.
    let mut a = join(&at(1), &channel).await;
    for i in 0..MAX_HELD {
        send(&mut a, format!("held {i}").into_bytes()).await;
    }
    let mut b = join(&at(2), &channel).await;
    expect_op(&mut b, "peer-joined").await;
    for i in 0..MAX_HELD {
        assert_eq!(
            expect_binary(&mut b).await,
            format!("held {i}").into_bytes()
        );
    }
    expect_op(&mut a, "peer-joined").await;
    for i in 0..50 {
        send(&mut b, format!("live {i}").into_bytes()).await;
    }
    for i in 0..50 {
        assert_eq!(
            expect_binary(&mut a).await,
            format!("live {i}").into_bytes()
        );
    }
    assert_eq!(refused(try_join(&at(0), &channel).await).0, 409);
    assert_eq!(refused(try_join(&at(1), &channel).await).0, 409);
    assert_eq!(refused(try_join(&at(1), "00000000").await).0, 404);
    b.close(None).await.expect("close");
    expect_op(&mut a, "peer-left").await;
    a.close(None).await.expect("close");
    until_gone(&at(0), &channel).await;
}

// ---- held frames and order ----

async fn held_frames_arrive_in_order_then_live_ones(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let channel = channel(&alice).await;
    let mut a = join(&alice, &channel).await;
    for i in 0..MAX_HELD {
        send(&mut a, format!("held {i}").into_bytes()).await;
    }
    // A frame of exactly the largest size is held and passed whole.
    let big: Vec<u8> = (0..MAX_FRAME).map(|i| (i % 251) as u8).collect();
    let mut b = join(&bob, &channel).await;
    expect_op(&mut b, "peer-joined").await;
    for i in 0..MAX_HELD {
        assert_eq!(
            expect_binary(&mut b).await,
            format!("held {i}").into_bytes()
        );
    }
    expect_op(&mut a, "peer-joined").await;
    send(&mut a, big.clone()).await;
    assert_eq!(expect_binary(&mut b).await, big);
    // Both directions at once, each in order.
    for i in 0..200 {
        send(&mut a, format!("a {i}").into_bytes()).await;
        send(&mut b, format!("b {i}").into_bytes()).await;
    }
    for i in 0..200 {
        assert_eq!(expect_binary(&mut b).await, format!("a {i}").into_bytes());
        assert_eq!(expect_binary(&mut a).await, format!("b {i}").into_bytes());
    }
}

// ---- who may join ----

async fn a_third_side_is_refused_409_and_a_slot_is_never_reused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let carol = TestDevice::register(&server).await;
    let channel = channel(&alice).await;
    let mut a = join(&alice, &channel).await;
    let mut b = join(&bob, &channel).await;
    let (status, body) = refused(try_join(&carol, &channel).await);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "channel_full", "{body}");
    // Bob leaves: his place stays his, so Carol still cannot take it (one
    // guess per channel for anyone in the middle).
    b.close(None).await.expect("close");
    expect_op(&mut a, "peer-joined").await;
    expect_op(&mut a, "peer-left").await;
    let (status, _) = refused(try_join(&carol, &channel).await);
    assert_eq!(status, 409);
    // Alice's frames now go nowhere, and the channel stays until she leaves.
    send(&mut a, b"anyone?".to_vec()).await;
    let (status, _) = refused(try_join(&carol, &channel).await);
    assert_eq!(status, 409);
    a.close(None).await.expect("close");
    until_gone(&carol, &channel).await;
}

async fn unknown_and_malformed_channels_are_404(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let real = channel(&alice).await;
    let unknown = format!("{:08}", (real.parse::<u32>().unwrap() + 1) % 100_000_000);
    for id in [unknown.as_str(), "1234567", "123456789", "abcdefgh"] {
        let (status, body) = refused(try_join(&alice, id).await);
        assert_eq!(status, 404, "{id}: {body}");
        assert_eq!(body["error"], "not_found", "{id}: {body}");
    }
}

async fn an_expired_channel_closes_its_sides_and_is_gone(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.rendezvous_ttl_secs = 1).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let (status, body) = create(&alice).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let expires_at = body["expiresAt"].as_i64().unwrap();
    assert!(
        (now..=now + 1_500).contains(&expires_at),
        "{expires_at} vs {now}"
    );
    let channel = body["channel"].as_str().unwrap().to_owned();
    let mut a = join(&alice, &channel).await;
    assert_eq!(expect_closed(&mut a).await, Some(1000), "closed at expiry");
    let (status, body) = refused(try_join(&bob, &channel).await);
    assert_eq!(status, 404, "{body}");
    assert_eq!(metric(&server, "rendezvous_channels_open").await, 0);
}

async fn peer_left_is_sent_and_the_channel_ends_when_both_left(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let channel = channel(&alice).await;
    let mut a = join(&alice, &channel).await;
    let mut b = join(&bob, &channel).await;
    expect_op(&mut a, "peer-joined").await;
    expect_op(&mut b, "peer-joined").await;
    // What Bob sent before leaving arrives before `peer-left`.
    send(&mut b, b"last words".to_vec()).await;
    b.close(None).await.expect("close");
    assert_eq!(expect_binary(&mut a).await, b"last words");
    expect_op(&mut a, "peer-left").await;
    assert_eq!(metric(&server, "rendezvous_channels_open").await, 1);
    a.close(None).await.expect("close");
    until_gone(&alice, &channel).await;
    assert_eq!(metric(&server, "rendezvous_channels_open").await, 0);
}

// ---- bounds ----

async fn an_oversize_frame_closes_1009_and_text_closes_1003(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let channel = channel(&alice).await;
    let mut a = join(&alice, &channel).await;
    let mut b = join(&bob, &channel).await;
    expect_op(&mut a, "peer-joined").await;
    expect_op(&mut b, "peer-joined").await;
    send(&mut a, vec![7; MAX_FRAME + 1]).await;
    assert_eq!(expect_closed(&mut a).await, Some(1009));
    expect_op(&mut b, "peer-left").await;

    let channel = self::channel(&alice).await;
    let mut a = join(&alice, &channel).await;
    a.send(Message::Text(r#"{"op":"peer-joined"}"#.into()))
        .await
        .expect("ws send");
    assert_eq!(expect_closed(&mut a).await, Some(1003));
    until_gone(&alice, &channel).await;
}

async fn a_frame_past_the_held_bound_closes_1008(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let channel = channel(&alice).await;
    let mut a = join(&alice, &channel).await;
    for i in 0..=MAX_HELD {
        send(&mut a, vec![i as u8; 100]).await;
    }
    assert_eq!(expect_closed(&mut a).await, Some(1008));
    // Nobody is left on it: the channel and what it held are gone.
    until_gone(&alice, &channel).await;
}

// ---- limits and authentication ----

async fn creating_and_joining_are_rate_limited_per_account(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits = true;
        c.limits[courier::limits::Limit::RendezvousCreatePerAccount] =
            courier::limits::Rate::new(2, Duration::from_secs(3600));
        c.limits[courier::limits::Limit::RendezvousJoinPerAccount] =
            courier::limits::Rate::new(3, Duration::from_secs(3600));
    })
    .await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let first = channel(&alice).await;
    let second = channel(&alice).await;
    let (status, body) = create(&alice).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "rate_limited");
    assert!(body["retryAfter"].as_u64().unwrap() > 0, "{body}");
    // Another account has its own budget.
    let bobs = channel(&bob).await;

    // Failed joins count: three guesses (well-formed or not), then even a
    // real channel is 429.
    let unknown = (0..)
        .map(|n: u32| format!("{n:08}"))
        .find(|id| ![first.as_str(), second.as_str(), bobs.as_str()].contains(&id.as_str()))
        .unwrap();
    for guess in [unknown.as_str(), "1234567", "zzzzzzzz"] {
        let (status, _) = refused(try_join(&alice, guess).await);
        assert_eq!(status, 404, "{guess}");
    }
    let (status, body) = refused(try_join(&alice, &first).await);
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited", "{body}");
    // Bob is not limited by Alice's guesses.
    let _b = join(&bob, &first).await;
}

async fn joining_needs_credentials(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let channel = channel(&alice).await;
    let url = server.ws_url(&format!("/v1/rendezvous/{channel}"));
    let (status, body) = refused(refused_or(
        tokio_tungstenite::connect_async(url.as_str()).await,
    ));
    assert_eq!(status, 401, "{body}");
    let wrong = format!(
        "{url}?login={}&password={}",
        percent(&alice.login()),
        percent("not-the-password-at-all")
    );
    let (status, _) = refused(refused_or(
        tokio_tungstenite::connect_async(wrong.as_str()).await,
    ));
    assert_eq!(status, 401);
    // The query-string login works as on /v1/websocket; the refusals above
    // took no place on the channel.
    let right = format!(
        "{url}?login={}&password={}",
        percent(&alice.login()),
        percent(&alice.password)
    );
    let mut a = refused_or(tokio_tungstenite::connect_async(right.as_str()).await).expect("join");
    let mut b = join(&TestDevice::register(&server).await, &channel).await;
    expect_op(&mut a, "peer-joined").await;
    expect_op(&mut b, "peer-joined").await;
    let (status, _) = call(Method::POST, &server.url("/v1/rendezvous"), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

backends!(
    spake2_agrees_a_key_and_passes_identity_keys,
    a_wrong_code_yields_different_keys,
    held_frames_arrive_in_order_then_live_ones,
    a_third_side_is_refused_409_and_a_slot_is_never_reused,
    unknown_and_malformed_channels_are_404,
    an_expired_channel_closes_its_sides_and_is_gone,
    peer_left_is_sent_and_the_channel_ends_when_both_left,
    an_oversize_frame_closes_1009_and_text_closes_1003,
    a_frame_past_the_held_bound_closes_1008,
    creating_and_joining_are_rate_limited_per_account,
    joining_needs_credentials,
);
