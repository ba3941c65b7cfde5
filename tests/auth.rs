//! SPEC "Authentication", and who may delete which device or account.

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::*;
use reqwest::header::{HeaderMap, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// `GET /v1/devices` with a raw `Authorization` header (or none); returns the
/// status, the headers and the JSON body.
async fn devices_with_header(
    server: &TestServer,
    authorization: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = http().get(server.url("/v1/devices"));
    if let Some(value) = authorization {
        req = req.header(AUTHORIZATION, value);
    }
    let res = req.send().await.expect("request");
    let status = res.status();
    let headers = res.headers().clone();
    let text = res.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn assert_unauthorized(status: StatusCode, body: &Value, what: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    assert!(body["message"].is_string(), "{what}: {body}");
}

/// The device's credentials still work (`GET /v1/devices` is 200).
async fn works(device: &TestDevice) -> bool {
    let (status, _) = device.request(Method::GET, "/v1/devices", None).await;
    assert!(
        status == StatusCode::OK || status == StatusCode::UNAUTHORIZED,
        "unexpected {status}"
    );
    status == StatusCode::OK
}

fn device_ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .expect("device list")
        .iter()
        .map(|d| d["deviceId"].as_u64().expect("deviceId"))
        .collect()
}

async fn right_password_authenticates_wrong_one_is_401(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    assert!(works(&alice).await);

    for wrong in [
        format!("{}x", alice.password),
        alice.password[..alice.password.len() - 1].to_owned(),
        alice.password.to_uppercase(),
        String::new(),
    ] {
        let (status, _, body) =
            devices_with_header(&server, Some(&basic(&alice.login(), &wrong))).await;
        assert_unauthorized(status, &body, &format!("password {wrong:?}"));
    }
    let (status, headers, _) = devices_with_header(&server, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key("www-authenticate"));
    assert!(works(&alice).await);
}

async fn unknown_account_gets_the_same_401_as_a_wrong_password(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let unknown = "6f1c3d2e-8b4a-4c1e-9f00-0123456789ab";
    let (s1, h1, b1) =
        devices_with_header(&server, Some(&basic(&alice.login(), "wrong-password-0000"))).await;
    let (s2, h2, b2) =
        devices_with_header(&server, Some(&basic(unknown, "wrong-password-0000"))).await;
    let (s3, h3, b3) = devices_with_header(
        &server,
        Some(&basic(&format!("{unknown}.1"), &alice.password)),
    )
    .await;
    assert_unauthorized(s1, &b1, "wrong password");
    assert_eq!((s2, &b2), (s1, &b1), "unknown account differs");
    assert_eq!((s3, &b3), (s1, &b1), "unknown account differs");
    for h in [&h2, &h3] {
        assert_eq!(h.get("www-authenticate"), h1.get("www-authenticate"));
        assert_eq!(h.get("content-type"), h1.get("content-type"));
    }
}

async fn malformed_authorization_is_401(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let pw = &alice.password;
    let uuid = &alice.uuid;
    let headers = [
        "Bearer abcdef".to_owned(),
        "Basic".to_owned(),
        "Basic ".to_owned(),
        "Basic !!!not-base64!!!".to_owned(),
        format!("Basic {}", STANDARD.encode(format!("{uuid}{pw}"))),
        format!("Basic {}", STANDARD.encode([0xff, 0xfe, b':', b'x'])),
        format!("Digest {}", STANDARD.encode(format!("{uuid}:{pw}"))),
        basic("", pw),
        basic("not-a-uuid", pw),
        basic(&format!("{uuid}."), pw),
        basic(&format!("{uuid}.0"), pw),
        basic(&format!("{uuid}.-1"), pw),
        basic(&format!("{uuid}.abc"), pw),
        basic(&format!("{uuid}.1.1"), pw),
        basic(&format!("{uuid}.4294967296"), pw),
        basic(&uuid.replace('-', ""), pw),
        basic(&format!(" {uuid}"), pw),
        basic(&format!("{uuid}.1"), &format!(" {pw}")),
        basic(&format!("{uuid}.1"), &"x".repeat(5000)),
        format!("Basic {}", "A".repeat(10_000)),
    ];
    for header in &headers {
        let (status, _, body) = devices_with_header(&server, Some(header)).await;
        let shown: String = header.chars().take(80).collect();
        assert_unauthorized(status, &body, &shown);
    }
    // The scheme is case-insensitive (RFC 7617), and the server still works.
    let lower = basic(&alice.login(), pw).replacen("Basic", "basic", 1);
    assert_eq!(
        devices_with_header(&server, Some(&lower)).await.0,
        StatusCode::OK
    );
}

async fn bare_uuid_username_means_device_1(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;

    let (status, _, body) =
        devices_with_header(&server, Some(&basic(&primary.uuid, &primary.password))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(device_ids(&body), [1, 2]);
    // A bare UUID never means the linked device.
    let (status, _, body) =
        devices_with_header(&server, Some(&basic(&linked.uuid, &linked.password))).await;
    assert_unauthorized(status, &body, "bare UUID with the linked device's secret");
    let (status, _, _) =
        devices_with_header(&server, Some(&basic(&linked.login(), &linked.password))).await;
    assert_eq!(status, StatusCode::OK);
    // Nor does one device's secret open another.
    let (status, _, body) =
        devices_with_header(&server, Some(&basic(&linked.login(), &primary.password))).await;
    assert_unauthorized(status, &body, "device 2 with device 1's secret");
}

async fn device_that_does_not_exist_is_401(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    for device in [2u64, 3, 4_294_967_295] {
        let login = format!("{}.{device}", alice.uuid);
        let (status, _, body) =
            devices_with_header(&server, Some(&basic(&login, &alice.password))).await;
        assert_unauthorized(status, &body, &login);
    }
}

async fn passwords_with_colons_and_spaces_authenticate(backend: Backend) {
    let server = TestServer::start(backend).await;
    for password in [
        "a:b:c with spaces ~!@#$%^&*()".to_owned(),
        "                ".to_owned(),
        "~".repeat(256),
    ] {
        let (status, body) = call(
            Method::POST,
            &server.url("/v1/accounts"),
            None,
            Some(&json!({"password": password, "registrationId": 42})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{password:?}: {body}");
        let uuid = body["uuid"].as_str().expect("uuid");
        let (status, _, _) =
            devices_with_header(&server, Some(&basic(&format!("{uuid}.1"), &password))).await;
        assert_eq!(status, StatusCode::OK, "{password:?}");
        let truncated = &password[..password.len() - 1];
        let (status, _, _) =
            devices_with_header(&server, Some(&basic(&format!("{uuid}.1"), truncated))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{password:?}");
    }
}

/// Opens `/v1/websocket?QUERY`: the socket, or the status the upgrade was refused with.
async fn websocket_with_query(server: &TestServer, query: &str) -> Result<Ws, u16> {
    let url = server.ws_url(&format!("/v1/websocket?{query}"));
    match tokio_tungstenite::connect_async(url).await {
        Ok((stream, _)) => Ok(Ws { stream }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// SPEC: `?login=UUID.DEVICE&password=...` is percent-encoded, so a `+` in
/// it is a plus sign (form decoding would make it a space, and the secret
/// wrong). The same secret works over HTTP Basic.
async fn a_plus_in_a_password_stays_a_plus(backend: Backend) {
    let server = TestServer::start(backend).await;
    let password = "plus+and space+0123456789";
    let (status, body) = call(
        Method::POST,
        &server.url("/v1/accounts"),
        None,
        Some(&json!({"password": password, "registrationId": 77})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let uuid = body["uuid"].as_str().expect("uuid").to_owned();

    let (status, _, body) =
        devices_with_header(&server, Some(&basic(&format!("{uuid}.1"), password))).await;
    assert_eq!(status, StatusCode::OK, "HTTP Basic: {body}");

    for query in [
        format!("login={uuid}.1&password=plus+and%20space+0123456789"),
        format!("password=plus%2Band%20space%2B0123456789&login={uuid}"),
    ] {
        let mut ws = websocket_with_query(&server, &query)
            .await
            .unwrap_or_else(|status| panic!("{query}: upgrade refused with {status}"));
        assert_eq!(
            ws.next_json().await,
            json!({"op": "queue-empty"}),
            "{query}"
        );
        ws.close().await;
    }
    // A `+` never stands for a space.
    let spaces_as_plus = format!("login={uuid}.1&password=plus+and+space+0123456789");
    assert_eq!(
        websocket_with_query(&server, &spaces_as_plus).await.err(),
        Some(401)
    );
    // Query credentials count on WebSocket upgrades only.
    let (status, _) = call(
        Method::GET,
        &server.url(&format!(
            "/v1/devices?login={uuid}.1&password=plus%2Band%20space%2B0123456789"
        )),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn deleted_device_credentials_are_401(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;
    assert!(works(&linked).await);
    let (status, body) = primary
        .request(
            Method::DELETE,
            &format!("/v1/devices/{}", linked.device_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = linked.request(Method::GET, "/v1/devices", None).await;
    assert_unauthorized(status, &body, "deleted device");
    let (status, body) = linked.request(Method::GET, "/v1/keys/count", None).await;
    assert_unauthorized(status, &body, "deleted device");
    assert!(works(&primary).await);
}

/// SPEC: "A deleted device or account is refused from the moment the
/// delete is answered." Logins of a device (HTTP requests and WebSocket
/// upgrades) are hammered while the device is deleted; every one begun after
/// the `204` arrived must be `401`, including on a server whose cached
/// credentials a database read begun before the delete could refill. A short
/// cache TTL keeps such reads in flight all the time.
async fn no_login_succeeds_once_a_device_delete_is_answered(backend: Backend) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    const ROUNDS: usize = 12;
    let server = TestServer::start_with(backend, |c| c.device_cache_ttl_ms = 3).await;
    let primary = TestDevice::register(&server).await;
    for round in 0..ROUNDS {
        let victim = primary.link().await;
        let stop = Arc::new(AtomicBool::new(false));
        let header = basic(&victim.login(), &victim.password);
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (stop, header, url) = (stop.clone(), header.clone(), server.url("/v1/devices"));
            tasks.push(tokio::spawn(async move {
                let client = http();
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let res = client.get(&url).header(AUTHORIZATION, &header).send().await;
                    seen.push((started, res.expect("request").status().as_u16(), "http"));
                }
                seen
            }));
        }
        for _ in 0..3 {
            let (stop, header) = (stop.clone(), header.clone());
            let url = server.ws_url("/v1/websocket");
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut req = url.as_str().into_client_request().expect("ws request");
                    req.headers_mut()
                        .insert("Authorization", HeaderValue::from_str(&header).unwrap());
                    let started = Instant::now();
                    let status = match tokio_tungstenite::connect_async(req).await {
                        Ok((stream, _)) => {
                            Ws { stream }.close().await;
                            101
                        }
                        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                            resp.status().as_u16()
                        }
                        Err(e) => panic!("upgrade failed: {e}"),
                    };
                    seen.push((started, status, "websocket"));
                }
                seen
            }));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (status, body) = primary
            .request(
                Method::DELETE,
                &format!("/v1/devices/{}", victim.device_id),
                None,
            )
            .await;
        let answered = Instant::now();
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, Ordering::Relaxed);
        let (mut before, mut after) = (0, 0);
        for task in tasks {
            for (started, status, how) in task.await.expect("login task") {
                if started > answered {
                    after += 1;
                    assert_eq!(
                        status,
                        401,
                        "round {round}: a {how} login begun {:?} after the delete was answered",
                        started - answered
                    );
                } else if status != 401 {
                    before += 1;
                }
            }
        }
        assert!(
            before > 0 && after > 0,
            "round {round}: {before} before, {after} after"
        );
    }
}

async fn a_device_cannot_delete_another_accounts_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let alice2 = alice.link().await;
    let bob = TestDevice::register(&server).await;
    let bob2 = bob.link().await;
    assert_eq!(alice2.device_id, 2);
    let bob3 = bob.link().await;

    // Device ids name devices of the caller's own account only. Bob's
    // primary naming "2" removes Bob's device 2, never Alice's.
    let (status, body) = bob.request(Method::DELETE, "/v1/devices/2", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(!works(&bob2).await);
    assert!(works(&alice2).await);
    // Again: Bob has no device 2 any more.
    let (status, body) = bob.request(Method::DELETE, "/v1/devices/2", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found");
    // A linked device of Bob's cannot reach Alice's devices either.
    for path in [
        "/v1/devices/2".to_owned(),
        "/v1/devices/1".to_owned(),
        format!("/v1/devices/{}.2", alice.uuid),
        format!("/v1/devices/{}/2", alice.uuid),
    ] {
        let (status, body) = bob3.request(Method::DELETE, &path, None).await;
        assert!(
            [
                StatusCode::FORBIDDEN,
                StatusCode::NOT_FOUND,
                StatusCode::BAD_REQUEST
            ]
            .contains(&status),
            "{path}: {status} {body}"
        );
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    assert!(works(&alice).await);
    assert!(works(&alice2).await);
    let (_, list) = alice.request(Method::GET, "/v1/devices", None).await;
    assert_eq!(device_ids(&list), [1, 2]);
}

async fn linked_device_cannot_delete_the_primary_or_a_sibling(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let second = primary.link().await;
    let third = primary.link().await;
    for (target, what) in [(1, "primary"), (third.device_id, "sibling")] {
        let (status, body) = second
            .request(Method::DELETE, &format!("/v1/devices/{target}"), None)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {body}");
        assert_eq!(body["error"], "forbidden");
    }
    // The primary cannot delete itself this way either (only with the account).
    let (status, _) = primary.request(Method::DELETE, "/v1/devices/1", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for d in [&primary, &second, &third] {
        assert!(works(d).await, "device {} was removed", d.device_id);
    }
}

async fn linked_device_deletes_itself(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;
    let (status, body) = linked
        .request(
            Method::DELETE,
            &format!("/v1/devices/{}", linked.device_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(!works(&linked).await);
    let (_, list) = primary.request(Method::GET, "/v1/devices", None).await;
    assert_eq!(device_ids(&list), [1]);
}

async fn primary_deletes_a_linked_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let second = primary.link().await;
    let third = primary.link().await;
    let (status, body) = primary
        .request(
            Method::DELETE,
            &format!("/v1/devices/{}", second.device_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(!works(&second).await);
    assert!(works(&third).await);
    let (_, list) = primary.request(Method::GET, "/v1/devices", None).await;
    assert_eq!(device_ids(&list), [1, 3]);
    // Gone is gone.
    let (status, body) = primary
        .request(
            Method::DELETE,
            &format!("/v1/devices/{}", second.device_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

async fn only_the_primary_deletes_the_account(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let second = primary.link().await;
    let third = primary.link().await;
    let bystander = TestDevice::register(&server).await;

    let (status, body) = second
        .request(Method::DELETE, "/v1/accounts/me", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "forbidden");
    for d in [&primary, &second, &third] {
        assert!(works(d).await);
    }

    let (status, body) = primary
        .request(Method::DELETE, "/v1/accounts/me", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for d in [&primary, &second, &third] {
        let (status, body) = d.request(Method::GET, "/v1/devices", None).await;
        assert_unauthorized(
            status,
            &body,
            &format!("device {} after delete", d.device_id),
        );
    }
    let (status, _, _) =
        devices_with_header(&server, Some(&basic(&primary.uuid, &primary.password))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(works(&bystander).await);
}

/// A device deleted by a process this server does not hear from (another
/// server on the same database, outside any cluster) is refused once its
/// cached credentials are read again: while it keeps authenticating, that
/// is before the cache's TTL, not at it.
async fn credentials_in_use_are_read_again_before_they_expire(backend: Backend) {
    const TTL: Duration = Duration::from_millis(4_000);
    let server =
        TestServer::start_with(backend, |c| c.device_cache_ttl_ms = TTL.as_millis() as u64).await;
    let other = TestServer::launch_node(server.config.clone()).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;
    assert!(works(&linked).await);
    // The entry was made before this instant.
    let cached = Instant::now();
    let primary_elsewhere = TestDevice {
        base: other.url(""),
        ..primary.clone()
    };
    let path = format!("/v1/devices/{}", linked.device_id);
    let (status, body) = primary_elsewhere.request(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(works(&linked).await, "a fresh entry is used as it is");

    // Past the age at which an entry in use is read again (half to three
    // quarters of the TTL): still verified against the entry, and read.
    tokio::time::sleep_until((cached + TTL * 76 / 100).into()).await;
    assert!(works(&linked).await, "an entry due for a read is used");
    while works(&linked).await {
        assert!(
            cached.elapsed() < TTL * 95 / 100,
            "the deletion is still unseen near the end of the TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(other);
}

backends!(
    credentials_in_use_are_read_again_before_they_expire,
    right_password_authenticates_wrong_one_is_401,
    unknown_account_gets_the_same_401_as_a_wrong_password,
    malformed_authorization_is_401,
    bare_uuid_username_means_device_1,
    device_that_does_not_exist_is_401,
    passwords_with_colons_and_spaces_authenticate,
    a_plus_in_a_password_stays_a_plus,
    deleted_device_credentials_are_401,
    no_login_succeeds_once_a_device_delete_is_answered,
    a_device_cannot_delete_another_accounts_device,
    linked_device_cannot_delete_the_primary_or_a_sibling,
    linked_device_deletes_itself,
    primary_deletes_a_linked_device,
    only_the_primary_deletes_the_account,
);
