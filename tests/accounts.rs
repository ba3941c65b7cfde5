//! SPEC "Accounts and devices": registration (and its token), linking with a
//! provisioning code, listing and deleting devices, deleting the account.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use courier::limits::Limit;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PASSWORD: &str = "a-good-password-0123456789";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

async fn register_raw(server: &TestServer, body: &Value) -> (StatusCode, Value) {
    call(Method::POST, &server.url("/v1/accounts"), None, Some(body)).await
}

async fn link_raw(server: &TestServer, body: &Value) -> (StatusCode, Value) {
    call(Method::POST, &server.url("/v1/devices"), None, Some(body)).await
}

/// A fresh provisioning code from `primary`, asserting 201.
async fn provisioning_code(primary: &TestDevice) -> String {
    let (status, body) = primary
        .request(Method::POST, "/v1/devices/provisioning", None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["code"].as_str().expect("code").to_owned()
}

fn link_body(code: &str) -> Value {
    json!({"code": code, "password": PASSWORD, "registrationId": 7})
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "body: {body}");
    assert_eq!(body["error"], code, "body: {body}");
    assert!(body["message"].is_string(), "no message: {body}");
}

async fn devices(device: &TestDevice) -> Vec<Value> {
    let (status, body) = device.request(Method::GET, "/v1/devices", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body.as_array().expect("device list").clone()
}

fn ids(list: &[Value]) -> Vec<u64> {
    list.iter()
        .map(|d| d["deviceId"].as_u64().expect("deviceId"))
        .collect()
}

async fn register_returns_a_fresh_uuid_and_device_1(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let (status, body) =
            register_raw(&server, &json!({"password": PASSWORD, "registrationId": 1})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["deviceId"], 1);
        let uuid = body["uuid"].as_str().expect("uuid");
        // A hyphenated lowercase UUIDv4.
        assert_eq!(uuid.len(), 36, "{uuid}");
        assert_eq!(uuid.as_bytes()[14], b'4', "not v4: {uuid}");
        assert!(uuid
            .chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert!(seen.insert(uuid.to_owned()), "uuid reused");
    }
}

async fn register_refuses_bad_passwords_and_registration_ids(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bad = [
        (
            "password of 15",
            json!({"password": "x".repeat(15), "registrationId": 1}),
        ),
        (
            "password of 257",
            json!({"password": "x".repeat(257), "registrationId": 1}),
        ),
        (
            "empty password",
            json!({"password": "", "registrationId": 1}),
        ),
        (
            "newline",
            json!({"password": "0123456789abcdef\n", "registrationId": 1}),
        ),
        (
            "tab",
            json!({"password": "0123456789\tabcdef", "registrationId": 1}),
        ),
        (
            "DEL",
            json!({"password": "0123456789abcdef\u{7f}", "registrationId": 1}),
        ),
        (
            "NUL",
            json!({"password": "0123456789abcdef\u{0}", "registrationId": 1}),
        ),
        (
            "non-ASCII",
            json!({"password": "0123456789abcdéf", "registrationId": 1}),
        ),
        (
            "registrationId 0",
            json!({"password": PASSWORD, "registrationId": 0}),
        ),
        (
            "registrationId 16381",
            json!({"password": PASSWORD, "registrationId": 16381}),
        ),
        (
            "registrationId -1",
            json!({"password": PASSWORD, "registrationId": -1}),
        ),
        (
            "registrationId 2^40",
            json!({"password": PASSWORD, "registrationId": 1u64 << 40}),
        ),
        (
            "registrationId string",
            json!({"password": PASSWORD, "registrationId": "5"}),
        ),
        ("no registrationId", json!({"password": PASSWORD})),
        ("no password", json!({"registrationId": 5})),
        (
            "password a number",
            json!({"password": 1234567890123456789u64, "registrationId": 5}),
        ),
    ];
    for (what, body) in bad {
        let (status, body) = register_raw(&server, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    }
    // The bounds themselves are fine.
    for body in [
        json!({"password": "x".repeat(16), "registrationId": 1}),
        json!({"password": "~".repeat(256), "registrationId": 16380}),
    ] {
        let (status, res) = register_raw(&server, &body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}: {res}");
    }
}

async fn registration_token_is_required_when_configured(backend: Backend) {
    let token = "operator-token-42";
    let server =
        TestServer::start_with(backend, |c| c.registration_token = Some(token.into())).await;
    for (what, body) in [
        (
            "missing",
            json!({"password": PASSWORD, "registrationId": 1}),
        ),
        (
            "wrong",
            json!({"password": PASSWORD, "registrationId": 1, "registrationToken": "operator-token-43"}),
        ),
        (
            "prefix",
            json!({"password": PASSWORD, "registrationId": 1, "registrationToken": "operator"}),
        ),
        (
            "empty",
            json!({"password": PASSWORD, "registrationId": 1, "registrationToken": ""}),
        ),
    ] {
        let (status, body) = register_raw(&server, &body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {body}");
        assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    }
    let (status, body) = register_raw(
        &server,
        &json!({"password": PASSWORD, "registrationId": 1, "registrationToken": token}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["deviceId"], 1);

    // Without a configured token, one given anyway is ignored.
    let open = TestServer::start(backend).await;
    let (status, body) = register_raw(
        &open,
        &json!({"password": PASSWORD, "registrationId": 1, "registrationToken": "anything"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

async fn linking_with_a_provisioning_code_adds_the_next_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let before = now_ms();
    let (status, body) = primary
        .request(Method::POST, "/v1/devices/provisioning", None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let code = body["code"].as_str().expect("code").to_owned();
    assert!(code.len() >= 16, "short code {code:?}");
    let expires_at = body["expiresAt"].as_i64().expect("expiresAt");
    // "Valid for minutes" (default 600 s).
    assert!(expires_at >= before + 60_000, "expiresAt {expires_at}");
    assert!(expires_at <= now_ms() + 3_600_000, "expiresAt {expires_at}");

    let (status, body) = link_raw(
        &server,
        &json!({"code": code, "password": PASSWORD, "registrationId": 16380}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["uuid"].as_str(), Some(primary.uuid.as_str()));
    assert_eq!(body["deviceId"], 2);
    let linked = TestDevice {
        device_id: 2,
        password: PASSWORD.into(),
        registration_id: 16380,
        ..primary.clone()
    };
    let third = primary.link().await;
    assert_eq!(third.device_id, 3);

    // Every device sees the same list.
    for d in [&primary, &linked, &third] {
        let list = devices(d).await;
        assert_eq!(ids(&list), [1, 2, 3]);
        assert_eq!(list[0]["registrationId"], primary.registration_id);
        assert_eq!(list[1]["registrationId"], 16380);
        assert_eq!(list[2]["registrationId"], third.registration_id);
        for entry in &list {
            let created = entry["createdAt"].as_i64().expect("createdAt");
            let seen = entry["lastSeenAt"].as_i64().expect("lastSeenAt");
            assert!(created >= before - 60_000 && created <= now_ms(), "{entry}");
            assert!(seen >= created, "{entry}");
        }
    }
}

async fn provisioning_code_links_only_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let code = provisioning_code(&primary).await;
    let (status, body) = link_raw(&server, &link_body(&code)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = link_raw(&server, &link_body(&code)).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(ids(&devices(&primary).await), [1, 2]);
}

async fn provisioning_code_used_concurrently_links_one_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let code = provisioning_code(&primary).await;
    let url = server.url("/v1/devices");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            let body = link_body(&code);
            tokio::spawn(async move { call(Method::POST, &url, None, Some(&body)).await })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        let (status, body) = t.await.expect("link task");
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::FORBIDDEN => assert_eq!(body["error"], "forbidden"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(ids(&devices(&primary).await), [1, 2]);
}

/// Links racing with distinct codes must not take an account past
/// `max_devices`: the device count and the insert are one atomic step on
/// both databases. Several accounts, each two short of the cap, each get 16
/// concurrent links: exactly two succeed.
async fn concurrent_links_never_exceed_max_devices(backend: Backend) {
    const MAX_DEVICES: u32 = 4;
    const RACERS: usize = 16;
    let server = TestServer::start_with(backend, |c| {
        c.max_devices = MAX_DEVICES;
        c.db_pool_size = 16;
    })
    .await;
    let url = server.url("/v1/devices");
    for round in 0..4 {
        let primary = TestDevice::register(&server).await;
        primary.link().await;
        let mut codes = Vec::new();
        for _ in 0..RACERS {
            codes.push(provisioning_code(&primary).await);
        }
        let tasks: Vec<_> = codes
            .iter()
            .map(|code| {
                let url = url.clone();
                let body = link_body(code);
                tokio::spawn(async move { call(Method::POST, &url, None, Some(&body)).await })
            })
            .collect();
        let mut created = 0;
        for t in tasks {
            let (status, body) = t.await.expect("link task");
            match status {
                StatusCode::CREATED => created += 1,
                StatusCode::FORBIDDEN => assert_eq!(body["error"], "forbidden", "{body}"),
                other => panic!("unexpected {other}: {body}"),
            }
        }
        let list = devices(&primary).await;
        assert_eq!(created, 2, "round {round}: {created} links succeeded");
        assert_eq!(ids(&list), [1, 2, 3, 4], "round {round}");
    }
}

/// `PUT /v1/messages/{alice}` from `bob` with one copy per device of `set`.
async fn send_to(bob: &TestDevice, alice: &TestDevice, set: &[(u32, i64)]) -> (StatusCode, Value) {
    bob.send(&alice.uuid, set, b"hello").await
}

/// A device set changed by a link or a delete is what the Sesame check sees
/// from the moment the change is answered, even when a device-set read
/// begun before the change finishes after it. Each round makes two changes
/// at once (PostgreSQL runs the second link just after the first commits),
/// while sends hammer the account so that reads are in flight when the
/// second commits. Once both are answered, a send naming only one of the two
/// changes is `409`, and one naming both is `200`.
async fn the_device_set_check_sees_a_link_or_delete_once_answered(backend: Backend) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const ROUNDS: usize = 8;
    const PIPELINE: u64 = 16;
    let server = TestServer::start_with(backend, |c| c.max_devices = 1_000).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    let bobs = [bob.clone(), bob.link().await, bob.link().await];
    let base = vec![alice.target()];
    for round in 0..ROUNDS {
        // Sends that every check refuses (device 999999 does not exist), to
        // keep device-set reads going.
        let stop = Arc::new(AtomicBool::new(false));
        let mut hammer = Vec::new();
        for sender in &bobs {
            let mut ws = sender.connect().await;
            ws.drain_queue().await;
            let mut body = send_body(&[alice.target(), (999_999, 1)], b"noise", false);
            body["op"] = json!("send");
            body["destination"] = json!(alice.uuid);
            let stop = stop.clone();
            hammer.push(tokio::spawn(async move {
                let mut id = 0;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..PIPELINE {
                        id += 1;
                        body["id"] = json!(id);
                        ws.send_json(&body).await;
                    }
                    for _ in 0..PIPELINE {
                        let (r, _) = ws.until_op("response").await;
                        assert_eq!(r["status"], 409, "{r}");
                    }
                }
                ws.close().await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;

        // Two links at once.
        let codes = [
            provisioning_code(&alice).await,
            provisioning_code(&alice).await,
        ];
        let links = codes.map(|code| {
            let url = server.url("/v1/devices");
            tokio::spawn(async move {
                let body = json!({"code": code, "password": PASSWORD, "registrationId": 9});
                call(Method::POST, &url, None, Some(&body)).await
            })
        });
        let mut linked = Vec::new();
        for link in links {
            let (status, body) = link.await.expect("link task");
            assert_eq!(status, StatusCode::CREATED, "{body}");
            linked.push((body["deviceId"].as_u64().unwrap() as u32, 9));
        }
        for (i, only) in linked.iter().enumerate() {
            let partial = [base.clone(), vec![*only]].concat();
            let (status, body) = send_to(&bob, &alice, &partial).await;
            assert_eq!(
                status,
                StatusCode::CONFLICT,
                "round {round}: a send without the answered link of device {} was accepted: {body}",
                linked[1 - i].0
            );
            assert_eq!(body["missingDevices"], json!([linked[1 - i].0]), "{body}");
        }
        let full = [base.clone(), linked.clone()].concat();
        let (status, body) = send_to(&bob, &alice, &full).await;
        assert_eq!(status, StatusCode::OK, "{body}");

        // Two deletes at once.
        let deletes: Vec<_> = linked
            .iter()
            .map(|&(id, _)| {
                let alice = alice.clone();
                tokio::spawn(async move {
                    let path = format!("/v1/devices/{id}");
                    alice.request(Method::DELETE, &path, None).await
                })
            })
            .collect();
        for delete in deletes {
            let (status, body) = delete.await.expect("delete task");
            assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        }
        for kept in &linked {
            let stale = [base.clone(), vec![*kept]].concat();
            let (status, body) = send_to(&bob, &alice, &stale).await;
            assert_eq!(
                status,
                StatusCode::CONFLICT,
                "round {round}: a send to deleted device {} was accepted: {body}",
                kept.0
            );
            assert_eq!(body["extraDevices"], json!([kept.0]), "{body}");
        }
        stop.store(true, Ordering::Relaxed);
        for task in hammer {
            task.await.expect("hammer task");
        }
    }
}

async fn unknown_provisioning_codes_are_refused_and_bad_link_bodies_are_400(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let code = provisioning_code(&primary).await;
    let mut altered = code.clone().into_bytes();
    altered[0] = if altered[0] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).expect("ascii");
    for bad in [
        altered.as_str(),
        "",
        "AAAAAAAAAAAAAAAAAAAAAA",
        &"A".repeat(10_000),
    ] {
        let (status, body) = link_raw(&server, &link_body(bad)).await;
        assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    }
    // Bad bodies are 400 (a bad code is not 400).
    for body in [
        json!({"code": code, "password": "short", "registrationId": 7}),
        json!({"code": code, "password": PASSWORD, "registrationId": 0}),
        json!({"code": code, "password": PASSWORD}),
        json!({"password": PASSWORD, "registrationId": 7}),
    ] {
        let (status, res) = link_raw(&server, &body).await;
        assert_error(status, &res, StatusCode::BAD_REQUEST, "bad_request");
    }
    assert_eq!(ids(&devices(&primary).await), [1]);
}

async fn linked_device_cannot_create_a_provisioning_code(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;
    let (status, body) = linked
        .request(Method::POST, "/v1/devices/provisioning", None)
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, _) = call(
        Method::POST,
        &server.url("/v1/devices/provisioning"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn expired_provisioning_code_is_refused(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.provisioning_code_ttl_secs = 1).await;
    let primary = TestDevice::register(&server).await;
    let before = now_ms();
    let (status, body) = primary
        .request(Method::POST, "/v1/devices/provisioning", None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let code = body["code"].as_str().expect("code").to_owned();
    let expires_at = body["expiresAt"].as_i64().expect("expiresAt");
    assert!(
        (before + 900..=now_ms() + 1_100).contains(&expires_at),
        "expiresAt {expires_at}, asked at {before}"
    );
    // A fresh code still works within its second...
    let fresh = provisioning_code(&primary).await;
    let (status, body) = link_raw(&server, &link_body(&fresh)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // ...the first one not after it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, body) = link_raw(&server, &link_body(&code)).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(ids(&devices(&primary).await), [1, 2]);
}

async fn device_list_shows_only_the_callers_account(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let alice2 = alice.link().await;
    let bob = TestDevice::register(&server).await;
    assert_eq!(ids(&devices(&alice).await), [1, 2]);
    assert_eq!(ids(&devices(&alice2).await), [1, 2]);
    let bobs = devices(&bob).await;
    assert_eq!(ids(&bobs), [1]);
    assert_eq!(bobs[0]["registrationId"], bob.registration_id);
}

async fn deleting_a_device_removes_its_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;
    let fetcher = TestDevice::register(&server).await;
    assert_eq!(primary.upload_vector(0).await, StatusCode::NO_CONTENT);
    assert_eq!(linked.upload_vector(0).await, StatusCode::NO_CONTENT);
    let all = format!("/v1/keys/{}/*", primary.uuid);

    let (status, body) = primary
        .request(
            Method::DELETE,
            &format!("/v1/devices/{}", linked.device_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = fetcher
        .request(
            Method::GET,
            &format!("/v1/keys/{}/{}", primary.uuid, linked.device_id),
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = fetcher.request(Method::GET, &all, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(body["devices"].as_array().expect("devices")), [1]);
    assert_eq!(ids(&devices(&primary).await), [1]);

    // A device linked afterwards starts with no keys and a new id.
    let relinked = primary.link().await;
    assert_ne!(relinked.device_id, 1);
    let (status, body) = relinked.request(Method::GET, "/v1/keys/count", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"count": 0, "pqCount": 0}));
}

async fn deleting_the_account_removes_everything(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;
    let fetcher = TestDevice::register(&server).await;
    assert_eq!(primary.upload_vector(0).await, StatusCode::NO_CONTENT);
    assert_eq!(linked.upload_vector(0).await, StatusCode::NO_CONTENT);
    let code = provisioning_code(&primary).await;

    let (status, body) = primary
        .request(Method::DELETE, "/v1/accounts/me", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for device in ["1", "2", "*"] {
        let (status, body) = fetcher
            .request(
                Method::GET,
                &format!("/v1/keys/{}/{device}", primary.uuid),
                None,
            )
            .await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    }
    // An outstanding linking code died with the account.
    let (status, body) = link_raw(&server, &link_body(&code)).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    for d in [&primary, &linked] {
        let (status, _) = d.request(Method::GET, "/v1/devices", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Others are untouched, and registering again gives a new account.
    assert_eq!(ids(&devices(&fetcher).await), [1]);
    let again = TestDevice::register(&server).await;
    assert_ne!(again.uuid, primary.uuid);
    assert_eq!(again.upload_vector(0).await, StatusCode::NO_CONTENT);
}

async fn deleting_a_device_or_the_account_closes_its_sockets(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let second = primary.link().await;
    let third = primary.link().await;
    let mut sockets = Vec::new();
    for d in [&primary, &second, &third] {
        let mut ws = d.connect().await;
        ws.drain_queue().await;
        sockets.push(ws);
    }
    let mut ws3 = sockets.pop().expect("third");
    let mut ws2 = sockets.pop().expect("second");
    let mut ws1 = sockets.pop().expect("primary");

    let (status, _) = primary
        .request(
            Method::DELETE,
            &format!("/v1/devices/{}", second.device_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    ws2.closed().await;
    // Only that device's socket.
    for ws in [&mut ws1, &mut ws3] {
        let frame = ws.next_within(Duration::from_millis(300)).await;
        assert!(frame.is_none(), "{frame:?}");
    }

    let (status, _) = primary
        .request(Method::DELETE, "/v1/accounts/me", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    ws1.closed().await;
    ws3.closed().await;
}

async fn registration_is_rate_limited_per_ip(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits = true;
        c.limits[Limit::RegisterPerIp] = "2/h".parse().expect("rate");
    })
    .await;
    let body = json!({"password": PASSWORD, "registrationId": 1});
    for _ in 0..2 {
        assert_eq!(register_raw(&server, &body).await.0, StatusCode::CREATED);
    }
    let res = http()
        .post(server.url("/v1/accounts"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = res
        .headers()
        .get("retry-after")
        .expect("Retry-After header")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("Retry-After in seconds");
    let json: Value = res.json().await.expect("JSON body");
    assert_eq!(json["error"], "rate_limited", "{json}");
    assert!(json["message"].is_string(), "{json}");
    assert_eq!(json["retryAfter"], retry_after, "{json}");
    // Two per hour: the next one is about half an hour away.
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    // X-Forwarded-For from a peer that is not a trusted proxy changes nothing.
    let res = http()
        .post(server.url("/v1/accounts"))
        .header("x-forwarded-for", "203.0.113.7")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

backends!(
    register_returns_a_fresh_uuid_and_device_1,
    register_refuses_bad_passwords_and_registration_ids,
    registration_token_is_required_when_configured,
    linking_with_a_provisioning_code_adds_the_next_device,
    provisioning_code_links_only_once,
    provisioning_code_used_concurrently_links_one_device,
    concurrent_links_never_exceed_max_devices,
    the_device_set_check_sees_a_link_or_delete_once_answered,
    unknown_provisioning_codes_are_refused_and_bad_link_bodies_are_400,
    linked_device_cannot_create_a_provisioning_code,
    expired_provisioning_code_is_refused,
    device_list_shows_only_the_callers_account,
    deleting_a_device_removes_its_keys,
    deleting_the_account_removes_everything,
    deleting_a_device_or_the_account_closes_its_sockets,
    registration_is_rate_limited_per_ip,
);
