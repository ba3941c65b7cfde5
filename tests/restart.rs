//! Everything of the foundation lives in the database: accounts, device
//! credentials, keys, which one-time keys were handed out, and linking codes
//! survive a restart of the server on the same SQLite file or PostgreSQL database.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn ec_key(n: u32) -> String {
    let mut key = [0x42u8; 33];
    key[0] = 0x05;
    key[1..5].copy_from_slice(&n.to_le_bytes());
    b64(&key)
}

fn upload(pre_key_ids: impl IntoIterator<Item = u32>, pq_ids: &[u32]) -> Value {
    let mut v = vectors()["valid"][0].clone();
    v["preKeys"] = pre_key_ids
        .into_iter()
        .map(|id| json!({"keyId": id, "publicKey": ec_key(id)}))
        .collect();
    v["pqPreKeys"] = pq_ids
        .iter()
        .map(|id| {
            let mut k = v["pqLastResortPreKey"].clone();
            k["keyId"] = json!(id);
            k
        })
        .collect();
    v
}

/// The same device, talking to `server` (a restarted server has a new port).
fn on(server: &TestServer, device: &TestDevice) -> TestDevice {
    TestDevice {
        base: server.url(""),
        ..device.clone()
    }
}

async fn count(device: &TestDevice) -> Value {
    let (status, body) = device.request(Method::GET, "/v1/keys/count", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn devices(device: &TestDevice) -> Value {
    let (status, body) = device.request(Method::GET, "/v1/devices", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Fetches device 1's bundle; returns `(preKey id, pqPreKey id)`.
async fn take(by: &TestDevice, account: &str) -> (Option<u64>, u64) {
    let (status, body) = by
        .request(Method::GET, &format!("/v1/keys/{account}/1"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let d = &body["devices"][0];
    (
        d.get("preKey").map(|k| k["keyId"].as_u64().expect("keyId")),
        d["pqPreKey"]["keyId"].as_u64().expect("pq keyId"),
    )
}

async fn keys_devices_and_credentials_survive_a_restart(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let database_url = server.config.database_url.clone();
    let alice = TestDevice::register(&server).await;
    let (status, body) = alice
        .request(Method::PUT, "/v1/keys", Some(&upload(1..=6, &[900, 901])))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let alice2 = alice.link().await;
    let (status, body) = alice2
        .request(Method::PUT, "/v1/keys", Some(&upload([50], &[])))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let gone = alice.link().await;
    let (status, _) = alice
        .request(
            Method::DELETE,
            &format!("/v1/devices/{}", gone.device_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let bob = TestDevice::register(&server).await;
    let (status, code) = alice
        .request(Method::POST, "/v1/devices/provisioning", None)
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // Handed out before the restart: key 1 and PQ key 900.
    assert_eq!(take(&bob, &alice.uuid).await, (Some(1), 900));
    let list_before = devices(&alice).await;
    assert_eq!(count(&alice).await, json!({"count": 5, "pqCount": 1}));

    for round in 0..2 {
        server = server.restart().await;
        assert_eq!(server.config.database_url, database_url);
        let (alice, alice2, gone, bob) = (
            on(&server, &alice),
            on(&server, &alice2),
            on(&server, &gone),
            on(&server, &bob),
        );
        // Same credentials, same devices, same counts.
        assert_eq!(devices(&alice).await, list_before, "round {round}");
        assert_eq!(devices(&alice2).await, list_before, "round {round}");
        devices(&bob).await;
        let (status, _) = gone.request(Method::GET, "/v1/devices", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "deleted device came back");
        let wrong = TestDevice {
            password: "not-the-password-0123".into(),
            ..alice.clone()
        };
        let (status, _) = wrong.request(Method::GET, "/v1/devices", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let expected = if round == 0 {
            json!({"count": 5, "pqCount": 1})
        } else {
            json!({"count": 4, "pqCount": 0})
        };
        assert_eq!(count(&alice).await, expected, "round {round}");
        assert_eq!(count(&alice2).await, json!({"count": 1, "pqCount": 0}));
        // The identity key is still the account's.
        let mut other = vectors()["valid"][1].clone();
        other["preKeys"] = json!([]);
        let (status, body) = alice2.request(Method::PUT, "/v1/keys", Some(&other)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        if round == 0 {
            // One key out between the two restarts.
            assert_eq!(take(&bob, &alice.uuid).await, (Some(2), 901));
        }
    }

    // After both restarts: keys 3..=6 once each, never 1 or 2 again.
    let alice = on(&server, &alice);
    let bob = on(&server, &bob);
    let mut issued = Vec::new();
    for _ in 0..5 {
        let (pre_key, pq) = take(&bob, &alice.uuid).await;
        // PQ one-time keys are used up: the last-resort key (id 200) stands in.
        assert_eq!(pq, 200);
        issued.extend(pre_key);
    }
    assert_eq!(issued, [3, 4, 5, 6]);

    // A linking code made before the restarts still links, with a fresh id.
    let code = code["code"].as_str().expect("code");
    let (status, body) = call(
        Method::POST,
        &server.url("/v1/devices"),
        None,
        Some(&json!({"code": code, "password": "after-restart-0123456789", "registrationId": 9})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let new_id = body["deviceId"].as_u64().expect("deviceId");
    assert!(![1, 2].contains(&new_id), "device id {new_id} reused");
    let ids: Vec<u64> = devices(&alice)
        .await
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["deviceId"].as_u64().expect("deviceId"))
        .collect();
    assert_eq!(ids, [1, 2, new_id]);
    // And new accounts do not collide with old ones.
    let carol = TestDevice::register(&server).await;
    assert_ne!(carol.uuid, alice.uuid);
    assert_ne!(carol.uuid, bob.uuid);
}

backends!(keys_devices_and_credentials_survive_a_restart);
