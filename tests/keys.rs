//! SPEC "Keys": `PUT /v1/keys`, `GET /v1/keys/count`, `GET /v1/keys/{uuid}/{deviceId}`.
//!
//! Key material comes from the libsignal-made vectors (`tests/data`);
//! one-time EC keys are unsigned, so the tests make their own (`0x05` + 32
//! bytes). PQ one-time keys must be signed by the identity key: the tests
//! reuse a vector's Kyber last-resort key and signature under another keyId.

mod common;

use std::collections::BTreeSet;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A one-time EC public key as libsignal serialises it, distinct for each `n`.
fn ec_key(n: u32) -> String {
    let mut key = [0x42u8; 33];
    key[0] = 0x05;
    key[1..5].copy_from_slice(&n.to_le_bytes());
    b64(&key)
}

/// `[{keyId, publicKey}]` for every id in `ids`.
fn pre_keys(ids: impl IntoIterator<Item = u32>) -> Value {
    Value::Array(
        ids.into_iter()
            .map(|id| json!({"keyId": id, "publicKey": ec_key(id)}))
            .collect(),
    )
}

fn valid(i: usize) -> Value {
    vectors()["valid"][i].clone()
}

/// `valid[i]` with its one-time keys replaced by `pre_keys`.
fn valid_with(i: usize, pre_keys: Value) -> Value {
    let mut v = valid(i);
    v["preKeys"] = pre_keys;
    v
}

/// `valid[i]`'s Kyber last-resort key (and signature) as a PQ one-time key `key_id`.
fn pq_one_time(i: usize, key_id: u32) -> Value {
    let mut k = valid(i)["pqLastResortPreKey"].clone();
    k["keyId"] = json!(key_id);
    k
}

async fn put_keys(device: &TestDevice, body: &Value) -> (StatusCode, Value) {
    device.request(Method::PUT, "/v1/keys", Some(body)).await
}

/// `(count, pqCount)` of `device`.
async fn count(device: &TestDevice) -> (i64, i64) {
    let (status, body) = device.request(Method::GET, "/v1/keys/count", None).await;
    assert_eq!(status, StatusCode::OK, "count: {body}");
    (
        body["count"].as_i64().expect("count"),
        body["pqCount"].as_i64().expect("pqCount"),
    )
}

async fn fetch(by: &TestDevice, account: &str, device: &str) -> (StatusCode, Value) {
    by.request(Method::GET, &format!("/v1/keys/{account}/{device}"), None)
        .await
}

/// A `200` bundle of `account`'s `device`.
async fn bundle(by: &TestDevice, account: &str, device: &str) -> Value {
    let (status, body) = fetch(by, account, device).await;
    assert_eq!(status, StatusCode::OK, "bundle {account}/{device}: {body}");
    body
}

/// Asserts the SPEC error body: `{"error": code, "message": text}`.
fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "body: {body}");
    assert_eq!(body["error"], code, "body: {body}");
    assert!(body["message"].is_string(), "no message: {body}");
}

/// `PUT /v1/keys` with a raw body and content type.
async fn put_raw(device: &TestDevice, content_type: &str, body: &str) -> (StatusCode, Value) {
    let res = http()
        .put(format!("{}/v1/keys", device.base))
        .basic_auth(device.login(), Some(&device.password))
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = res.status();
    let text = res.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn every_valid_vector_is_accepted_and_served_back(backend: Backend) {
    let server = TestServer::start(backend).await;
    let fetcher = TestDevice::register(&server).await;
    let vectors = vectors();
    let valid = vectors["valid"].as_array().expect("valid[]");
    assert!(!valid.is_empty());
    for (i, v) in valid.iter().enumerate() {
        let owner = TestDevice::register(&server).await;
        assert_eq!(
            owner.upload_vector(i).await,
            StatusCode::NO_CONTENT,
            "valid[{i}]"
        );
        assert_eq!(count(&owner).await, (1, 0), "valid[{i}]");

        let b = bundle(&fetcher, &owner.uuid, "1").await;
        assert_eq!(b["identityKey"], v["identityKey"], "valid[{i}]");
        let devices = b["devices"].as_array().expect("devices");
        assert_eq!(devices.len(), 1, "valid[{i}]: {b}");
        let d = &devices[0];
        assert_eq!(d["deviceId"], 1);
        assert_eq!(d["registrationId"], owner.registration_id);
        assert_eq!(d["signedPreKey"], v["signedPreKey"], "valid[{i}]");
        // No PQ one-time keys were uploaded: the last-resort key stands in.
        assert_eq!(d["pqPreKey"], v["pqLastResortPreKey"], "valid[{i}]");
        assert_eq!(d["preKey"], v["preKeys"][0], "valid[{i}]");
        assert_eq!(count(&owner).await, (0, 0), "valid[{i}]");

        // The one-time key went with the first bundle; the rest stays.
        let again = bundle(&fetcher, &owner.uuid, "1").await;
        let d = &again["devices"][0];
        assert!(
            d.get("preKey").is_none(),
            "valid[{i}] issued twice: {again}"
        );
        assert_eq!(d["signedPreKey"], v["signedPreKey"]);
        assert_eq!(d["pqPreKey"], v["pqLastResortPreKey"]);
        assert_eq!(again["identityKey"], v["identityKey"]);
    }
}

async fn every_invalid_vector_is_refused_and_nothing_is_stored(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let fetcher = TestDevice::register(&server).await;
    let vectors = vectors();
    let invalid = vectors["invalid"].as_array().expect("invalid[]");
    assert!(!invalid.is_empty());
    for v in invalid {
        let why = &v["why"];
        // Valid one-time keys ride along: none of them may be stored.
        let upload = json!({
            "identityKey": v["identityKey"],
            "signedPreKey": v["signedPreKey"],
            "preKeys": pre_keys(1..=5),
        });
        let (status, body) = put_keys(&owner, &upload).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{why}: {body}");
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_key",
        );
        assert_eq!(count(&owner).await, (0, 0), "{why}: keys were stored");
        let (status, body) = fetch(&fetcher, &owner.uuid, "1").await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    }
    // The refused identity key was not set either: another one is accepted.
    assert_ne!(invalid[0]["identityKey"], valid(0)["identityKey"]);
    assert_eq!(owner.upload_vector(0).await, StatusCode::NO_CONTENT);
    assert_eq!(
        bundle(&fetcher, &owner.uuid, "1").await["identityKey"],
        valid(0)["identityKey"]
    );
}

async fn a_bad_key_anywhere_in_an_upload_stores_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let fetcher = TestDevice::register(&server).await;

    let mut bad_last_resort = valid_with(0, pre_keys(1..=5));
    bad_last_resort["pqLastResortPreKey"] = valid(1)["pqLastResortPreKey"].clone();
    let mut bad_pq_one_time = valid_with(0, pre_keys(1..=5));
    bad_pq_one_time["pqPreKeys"] = json!([pq_one_time(0, 900), pq_one_time(1, 901)]);
    let mut bad_last_one_time = pre_keys(1..=5);
    bad_last_one_time[4]["publicKey"] = json!(b64(&[0x06; 33]));
    let bad_last_one_time = valid_with(0, bad_last_one_time);
    let mut bad_signed = valid_with(0, pre_keys(1..=5));
    bad_signed["signedPreKey"] = valid(1)["signedPreKey"].clone();

    for (what, upload) in [
        (
            "pqLastResortPreKey signed by another identity",
            bad_last_resort,
        ),
        (
            "second pqPreKeys entry signed by another identity",
            bad_pq_one_time,
        ),
        ("last preKeys entry with a bad type byte", bad_last_one_time),
        ("signedPreKey signed by another identity", bad_signed),
    ] {
        let (status, body) = put_keys(&owner, &upload).await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_key",
        );
        assert_eq!(count(&owner).await, (0, 0), "{what}: keys were stored");
        let (status, _) = fetch(&fetcher, &owner.uuid, "1").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{what}: a bundle exists");
    }
    // valid[0]'s identity key was never set: valid[1]'s is accepted.
    assert_eq!(owner.upload_vector(1).await, StatusCode::NO_CONTENT);
    assert_eq!(
        bundle(&fetcher, &owner.uuid, "1").await["identityKey"],
        valid(1)["identityKey"]
    );
}

async fn a_refused_upload_leaves_earlier_keys_untouched(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let fetcher = TestDevice::register(&server).await;
    assert_eq!(owner.upload_vector(0).await, StatusCode::NO_CONTENT);

    // A later upload with new one-time keys and a replacement signed prekey
    // whose signature is not by this identity key: none of it is stored.
    let v0 = valid(0);
    let later = json!({
        "identityKey": v0["identityKey"],
        "signedPreKey": valid(1)["signedPreKey"],
        "preKeys": pre_keys(1..=10),
        "pqPreKeys": [pq_one_time(0, 900)],
    });
    let (status, body) = put_keys(&owner, &later).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_key",
    );
    assert_eq!(count(&owner).await, (1, 0));

    let b = bundle(&fetcher, &owner.uuid, "1").await;
    let d = &b["devices"][0];
    assert_eq!(d["signedPreKey"], v0["signedPreKey"]);
    assert_eq!(d["preKey"], v0["preKeys"][0]);
    assert_eq!(d["pqPreKey"], v0["pqLastResortPreKey"]);
}

async fn linked_device_with_another_identity_key_gets_409(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;
    let fetcher = TestDevice::register(&server).await;
    assert_eq!(primary.upload_vector(0).await, StatusCode::NO_CONTENT);

    let (status, body) = put_keys(&linked, &valid_with(1, pre_keys(10..=12))).await;
    assert_error(status, &body, StatusCode::CONFLICT, "identity_key_mismatch");
    assert_eq!(count(&linked).await, (0, 0));
    let (status, _) = fetch(&fetcher, &primary.uuid, "2").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the refused upload was stored"
    );

    // The account's identity key is still valid[0]'s, and the linked device
    // may upload under it.
    let (status, body) = put_keys(&linked, &valid_with(0, pre_keys(10..=12))).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(count(&linked).await, (3, 0));
    let b = bundle(&fetcher, &primary.uuid, "2").await;
    assert_eq!(b["identityKey"], valid(0)["identityKey"]);
    assert_eq!(b["devices"][0]["deviceId"], linked.device_id);
    assert_eq!(b["devices"][0]["preKey"]["keyId"], 10);
}

async fn key_count_tracks_uploads_and_fetches(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let fetcher = TestDevice::register(&server).await;
    assert_eq!(count(&owner).await, (0, 0));

    let mut first = valid_with(0, pre_keys(1..=10));
    first["pqPreKeys"] = json!([pq_one_time(0, 900), pq_one_time(0, 901)]);
    assert_eq!(put_keys(&owner, &first).await.0, StatusCode::NO_CONTENT);
    assert_eq!(count(&owner).await, (10, 2));

    // Later uploads add to what is stored; only identityKey is required.
    let more = json!({"identityKey": valid(0)["identityKey"], "preKeys": pre_keys(11..=15)});
    assert_eq!(put_keys(&owner, &more).await.0, StatusCode::NO_CONTENT);
    assert_eq!(count(&owner).await, (15, 2));
    let pq_only = json!({
        "identityKey": valid(0)["identityKey"],
        "pqPreKeys": [pq_one_time(0, 902)],
    });
    assert_eq!(put_keys(&owner, &pq_only).await.0, StatusCode::NO_CONTENT);
    assert_eq!(count(&owner).await, (15, 3));

    bundle(&fetcher, &owner.uuid, "1").await;
    assert_eq!(count(&owner).await, (14, 2));
    bundle(&fetcher, &owner.uuid, "*").await;
    assert_eq!(count(&owner).await, (13, 1));
    // Another device's count is its own.
    let linked = owner.link().await;
    assert_eq!(count(&linked).await, (0, 0));
    assert_eq!(count(&owner).await, (13, 1));
}

async fn pq_one_time_key_is_issued_once_then_last_resort(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let fetcher = TestDevice::register(&server).await;
    let mut upload = valid(0);
    upload["pqPreKeys"] = json!([pq_one_time(0, 900)]);
    assert_eq!(put_keys(&owner, &upload).await.0, StatusCode::NO_CONTENT);
    assert_eq!(count(&owner).await, (1, 1));

    let first = bundle(&fetcher, &owner.uuid, "1").await;
    assert_eq!(first["devices"][0]["pqPreKey"], pq_one_time(0, 900));
    assert_eq!(count(&owner).await, (0, 0));
    let last_resort = &upload["pqLastResortPreKey"];
    for _ in 0..2 {
        let b = bundle(&fetcher, &owner.uuid, "1").await;
        assert_eq!(&b["devices"][0]["pqPreKey"], last_resort, "{b}");
        assert!(b["devices"][0].get("preKey").is_none());
    }
}

async fn one_time_keys_per_upload_are_limited_to_100(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;

    let (status, body) = put_keys(&owner, &valid_with(0, pre_keys(1..=101))).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let mut pq = valid_with(0, json!([]));
    pq["pqPreKeys"] = Value::Array((1..=101).map(|id| pq_one_time(0, id)).collect());
    let (status, body) = put_keys(&owner, &pq).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert_eq!(count(&owner).await, (0, 0));

    let mut hundred = valid_with(0, pre_keys(1..=100));
    hundred["pqPreKeys"] = Value::Array((1..=100).map(|id| pq_one_time(0, id)).collect());
    let (status, body) = put_keys(&owner, &hundred).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(count(&owner).await, (100, 100));
}

async fn stored_one_time_keys_are_bounded_per_device(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.max_one_time_keys = 150).await;
    let owner = TestDevice::register(&server).await;
    assert_eq!(
        put_keys(&owner, &valid_with(0, pre_keys(1..=100))).await.0,
        StatusCode::NO_CONTENT
    );
    let (status, body) = put_keys(&owner, &valid_with(0, pre_keys(101..=200))).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert_eq!(
        count(&owner).await,
        (100, 0),
        "part of a refused upload was stored"
    );
    assert_eq!(
        put_keys(&owner, &valid_with(0, pre_keys(101..=150)))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(count(&owner).await, (150, 0));
}

async fn duplicate_key_ids_in_one_upload_are_400(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;

    let mut dup = pre_keys([1, 2, 3]);
    dup[2]["keyId"] = json!(1);
    let (status, body) = put_keys(&owner, &valid_with(0, dup)).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");

    let mut pq_dup = valid_with(0, pre_keys([1, 2]));
    pq_dup["pqPreKeys"] = json!([pq_one_time(0, 7), pq_one_time(0, 7)]);
    let (status, body) = put_keys(&owner, &pq_dup).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");

    assert_eq!(count(&owner).await, (0, 0));
}

async fn malformed_key_material_is_422(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let fetcher = TestDevice::register(&server).await;

    let mut ec_wrong_type = [0x42u8; 33];
    ec_wrong_type[0] = 0x06;
    let no_type_byte = b64(&[0x42u8; 32]);
    let mut all_ones = [0xffu8; 33];
    all_ones[0] = 0x05;
    let url_safe = b64(&all_ones).replace('/', "_");
    assert!(url_safe.contains('_'));
    let kyber_as_ec = valid(0)["pqLastResortPreKey"]["publicKey"].clone();
    let mut cases: Vec<(&str, Value)> = Vec::new();
    for (what, key) in [
        ("preKey not base64", json!("not base64 at all!")),
        (
            "preKey URL-safe base64",
            json!(ec_key(0xfbff_fffb).replace('+', "-").replace('/', "_")),
        ),
        ("preKey 32 bytes", json!(no_type_byte)),
        ("preKey 34 bytes", json!(b64(&[0x05u8; 34]))),
        ("preKey type 0x06", json!(b64(&ec_wrong_type))),
        ("preKey is a Kyber key", kyber_as_ec.clone()),
        ("preKey empty", json!("")),
    ] {
        let mut keys = pre_keys(1..=3);
        keys[1]["publicKey"] = key;
        cases.push((what, valid_with(0, keys)));
    }
    let mut identity_type = valid(0);
    let mut raw = unb64(valid(0)["identityKey"].as_str().unwrap());
    raw[0] = 0x06;
    identity_type["identityKey"] = json!(b64(&raw));
    cases.push(("identityKey type 0x06", identity_type));
    let mut identity_short = valid(0);
    identity_short["identityKey"] = json!(no_type_byte);
    cases.push(("identityKey 32 bytes", identity_short));
    let mut identity_garbage = valid(0);
    identity_garbage["identityKey"] = json!("%%%%");
    cases.push(("identityKey not base64", identity_garbage));
    let mut sig_unpadded = valid(0);
    let sig = sig_unpadded["signedPreKey"]["signature"]
        .as_str()
        .unwrap()
        .trim_end_matches('=')
        .to_owned();
    sig_unpadded["signedPreKey"]["signature"] = json!(sig);
    cases.push(("signature without padding", sig_unpadded));
    let mut ec_as_kyber = valid(0);
    ec_as_kyber["pqLastResortPreKey"]["publicKey"] = json!(ec_key(1));
    cases.push(("pqLastResortPreKey is an EC key", ec_as_kyber));
    let mut kyber_type = valid(0);
    let mut raw = unb64(kyber_as_ec.as_str().unwrap());
    raw[0] = 0x05;
    kyber_type["pqLastResortPreKey"]["publicKey"] = json!(b64(&raw));
    cases.push(("pqLastResortPreKey type 0x05", kyber_type));

    for (what, upload) in cases {
        let (status, body) = put_keys(&owner, &upload).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_key",
        );
        assert_eq!(count(&owner).await, (0, 0), "{what}: keys were stored");
    }
    let (status, _) = fetch(&fetcher, &owner.uuid, "1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(owner.upload_vector(0).await, StatusCode::NO_CONTENT);
}

async fn malformed_json_is_400_with_error_body(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    for (what, content_type, body) in [
        ("truncated", "application/json", "{\"identityKey\": \"BbV"),
        ("not JSON", "application/json", "this is not json"),
        ("empty", "application/json", ""),
        ("null", "application/json", "null"),
        ("array", "application/json", "[]"),
        ("no identityKey", "application/json", "{\"preKeys\": []}"),
        ("not JSON content type", "text/plain", "{}"),
    ] {
        let (status, body) = put_raw(&owner, content_type, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    }
    assert_eq!(count(&owner).await, (0, 0));
    // The server is still fine.
    assert_eq!(owner.upload_vector(0).await, StatusCode::NO_CONTENT);
}

async fn wrong_json_types_are_400(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let mut cases: Vec<(String, Value)> = Vec::new();
    for bad_id in [
        json!("5"),
        json!(-1),
        json!(1u64 << 40),
        json!(1u64 << 32),
        json!(1.5),
        json!(null),
    ] {
        let mut keys = pre_keys(1..=2);
        keys[1]["keyId"] = bad_id.clone();
        cases.push((format!("preKeys keyId {bad_id}"), valid_with(0, keys)));
        let mut signed = valid(0);
        signed["signedPreKey"]["keyId"] = bad_id.clone();
        cases.push((format!("signedPreKey keyId {bad_id}"), signed));
        let mut pq = valid(0);
        pq["pqPreKeys"] = json!([pq_one_time(0, 5)]);
        pq["pqPreKeys"][0]["keyId"] = bad_id.clone();
        cases.push((format!("pqPreKeys keyId {bad_id}"), pq));
    }
    let mut identity_number = valid(0);
    identity_number["identityKey"] = json!(5);
    cases.push(("identityKey a number".into(), identity_number));
    cases.push((
        "preKeys an object".into(),
        valid_with(0, json!({"keyId": 1})),
    ));
    let mut key_number = pre_keys(1..=1);
    key_number[0]["publicKey"] = json!(12345);
    cases.push(("publicKey a number".into(), valid_with(0, key_number)));

    for (what, upload) in cases {
        let (status, body) = put_keys(&owner, &upload).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    }
    assert_eq!(count(&owner).await, (0, 0));
}

/// Uploads 50 one-time keys to each of `devices`, then fetches the bundle of
/// `target` (`"1"` or `"*"`) 100 times at once; every key must go out exactly once.
async fn fetch_concurrently(backend: Backend, linked_too: bool, target: &str) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let mut devices = vec![owner.clone()];
    if linked_too {
        devices.push(owner.link().await);
    }
    for (n, d) in devices.iter().enumerate() {
        let base = 1000 * (n as u32 + 1);
        let (status, body) = put_keys(d, &valid_with(0, pre_keys(base..base + 50))).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        assert_eq!(count(d).await, (50, 0));
    }
    let fetcher = TestDevice::register(&server).await;
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let fetcher = fetcher.clone();
            let path = format!("/v1/keys/{}/{target}", owner.uuid);
            tokio::spawn(async move { fetcher.request(Method::GET, &path, None).await })
        })
        .collect();
    let mut responses = Vec::new();
    for t in tasks {
        let (status, body) = t.await.expect("fetch task");
        assert_eq!(status, StatusCode::OK, "{body}");
        responses.push(body);
    }
    for (n, d) in devices.iter().enumerate() {
        let issued: Vec<u64> = responses
            .iter()
            .map(|b| {
                b["devices"]
                    .as_array()
                    .expect("devices")
                    .iter()
                    .find(|e| e["deviceId"] == d.device_id)
                    .unwrap_or_else(|| panic!("device {} missing: {b}", d.device_id))
            })
            .filter_map(|e| e.get("preKey"))
            .map(|k| k["keyId"].as_u64().expect("keyId"))
            .collect();
        assert_eq!(issued.len(), 50, "device {}: {issued:?}", d.device_id);
        let distinct: BTreeSet<u64> = issued.iter().copied().collect();
        let base = 1000 * (n as u64 + 1);
        assert_eq!(distinct, (base..base + 50).collect::<BTreeSet<_>>());
        assert_eq!(count(d).await, (0, 0));
    }
}

async fn one_time_key_issued_once_under_100_concurrent_fetches(backend: Backend) {
    fetch_concurrently(backend, false, "1").await;
}

async fn one_time_key_issued_once_under_100_concurrent_fetches_of_all_devices(backend: Backend) {
    fetch_concurrently(backend, true, "*").await;
}

async fn keys_stay_available_under_mixed_concurrent_load(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let (status, body) = put_keys(&owner, &valid_with(0, pre_keys(1..=40))).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let uploader = TestDevice::register(&server).await;
    assert_eq!(uploader.upload_vector(1).await, StatusCode::NO_CONTENT);
    let fetcher = TestDevice::register(&server).await;
    let identity = valid(1)["identityKey"].clone();

    // Bundle fetches, key uploads and registrations (other writers on the
    // same database) all at once: none of them may fail.
    let tasks: Vec<_> = (0..180u32)
        .map(|i| {
            let (owner, uploader, fetcher) = (owner.clone(), uploader.clone(), fetcher.clone());
            let identity = identity.clone();
            let register_url = server.url("/v1/accounts");
            tokio::spawn(async move {
                match i % 3 {
                    0 => {
                        let path = format!("/v1/keys/{}/1", owner.uuid);
                        ("fetch", fetcher.request(Method::GET, &path, None).await)
                    }
                    1 => {
                        let body =
                            json!({"identityKey": identity, "preKeys": pre_keys([5000 + i])});
                        ("upload", put_keys(&uploader, &body).await)
                    }
                    _ => {
                        let body =
                            json!({"password": "mixed-load-password-1", "registrationId": 3});
                        (
                            "register",
                            call(Method::POST, &register_url, None, Some(&body)).await,
                        )
                    }
                }
            })
        })
        .collect();
    let mut issued = Vec::new();
    for t in tasks {
        let (what, (status, body)) = t.await.expect("task");
        assert!(status.is_success(), "{what}: {status} {body}");
        if what == "fetch" {
            issued.extend(body["devices"][0].get("preKey").map(|k| k["keyId"].clone()));
        }
    }
    let distinct: BTreeSet<u64> = issued.iter().filter_map(Value::as_u64).collect();
    assert_eq!(issued.len(), 40);
    assert_eq!(distinct, (1..=40).collect::<BTreeSet<_>>());
    assert_eq!(count(&owner).await, (0, 0));
    assert_eq!(count(&uploader).await, (61, 0));
}

/// Two servers sharing one database (the deployment the store's
/// `FOR UPDATE SKIP LOCKED` take is for): still at most once.
async fn one_time_keys_issued_once_across_two_servers_on_one_database(backend: Backend) {
    let first = TestServer::start(backend).await;
    let placeholder = Database::Sqlite {
        dir: tempfile::tempdir().expect("temp dir"),
        path: "unused".into(),
    };
    let second = TestServer::launch(first.config.clone(), placeholder).await;
    let owner = TestDevice::register(&first).await;
    let (status, body) = put_keys(&owner, &valid_with(0, pre_keys(1..=50))).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let fetcher = TestDevice::register(&second).await;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let base = if i % 2 == 0 {
                first.url("")
            } else {
                second.url("")
            };
            let fetcher = TestDevice {
                base,
                ..fetcher.clone()
            };
            let path = format!("/v1/keys/{}/1", owner.uuid);
            tokio::spawn(async move { fetcher.request(Method::GET, &path, None).await })
        })
        .collect();
    let mut issued = Vec::new();
    for t in tasks {
        let (status, body) = t.await.expect("fetch task");
        assert_eq!(status, StatusCode::OK, "{body}");
        issued.extend(body["devices"][0].get("preKey").map(|k| k["keyId"].clone()));
    }
    let distinct: BTreeSet<u64> = issued.iter().filter_map(Value::as_u64).collect();
    assert_eq!(issued.len(), 50, "{issued:?}");
    assert_eq!(distinct, (1..=50).collect::<BTreeSet<_>>());
    drop(second);
}

async fn bundle_for_all_devices_lists_each_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;
    let fetcher = TestDevice::register(&server).await;
    assert_eq!(primary.upload_vector(0).await, StatusCode::NO_CONTENT);
    let (status, body) = put_keys(&linked, &valid_with(0, pre_keys([77]))).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    let b = bundle(&fetcher, &primary.uuid, "*").await;
    assert_eq!(b["identityKey"], valid(0)["identityKey"]);
    let mut devices = b["devices"].as_array().expect("devices").clone();
    devices.sort_by_key(|d| d["deviceId"].as_u64());
    assert_eq!(devices.len(), 2, "{b}");
    assert_eq!(devices[0]["deviceId"], 1);
    assert_eq!(devices[0]["registrationId"], primary.registration_id);
    assert_eq!(devices[0]["preKey"], valid(0)["preKeys"][0]);
    assert_eq!(devices[1]["deviceId"], linked.device_id);
    assert_eq!(devices[1]["registrationId"], linked.registration_id);
    assert_eq!(devices[1]["preKey"], pre_keys([77])[0]);
    for d in &devices {
        assert_eq!(d["signedPreKey"], valid(0)["signedPreKey"]);
        assert_eq!(d["pqPreKey"], valid(0)["pqLastResortPreKey"]);
    }
    // Both one-time keys went with that one bundle.
    assert_eq!(count(&primary).await, (0, 0));
    assert_eq!(count(&linked).await, (0, 0));
    let again = bundle(&fetcher, &primary.uuid, "*").await;
    assert_eq!(again["devices"].as_array().expect("devices").len(), 2);
    assert!(again["devices"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d.get("preKey").is_none()));
}

async fn unknown_account_or_device_without_keys_is_404(backend: Backend) {
    let server = TestServer::start(backend).await;
    let fetcher = TestDevice::register(&server).await;
    let primary = TestDevice::register(&server).await;
    let linked = primary.link().await;

    let unknown = "6f1c3d2e-8b4a-4c1e-9f00-0123456789ab";
    for device in ["1", "*"] {
        let (status, body) = fetch(&fetcher, unknown, device).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
        // Registered, but no keys uploaded yet.
        let (status, body) = fetch(&fetcher, &primary.uuid, device).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    }
    assert_eq!(primary.upload_vector(0).await, StatusCode::NO_CONTENT);
    // The linked device exists but has no keys; device 9 does not exist.
    for device in [linked.device_id.to_string(), "9".into()] {
        let (status, body) = fetch(&fetcher, &primary.uuid, &device).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    }
    // Those misses consumed nothing.
    assert_eq!(count(&primary).await, (1, 0));
}

async fn malformed_bundle_path_is_refused_with_error_body(backend: Backend) {
    let server = TestServer::start(backend).await;
    let fetcher = TestDevice::register(&server).await;
    let owner = TestDevice::register(&server).await;
    assert_eq!(owner.upload_vector(0).await, StatusCode::NO_CONTENT);
    let uuid = owner.uuid.as_str();
    let no_dashes = uuid.replace('-', "");
    for path in [
        "not-a-uuid/1".to_owned(),
        format!("{no_dashes}/1"),
        format!("{uuid}x/1"),
        format!("{uuid}/abc"),
        format!("{uuid}/0"),
        format!("{uuid}/-1"),
        format!("{uuid}/1.5"),
        format!("{uuid}/4294967296"),
        format!("{uuid}/99999999999999999999"),
        format!("{uuid}/%2A%2A"),
    ] {
        let (status, body) = fetcher
            .request(Method::GET, &format!("/v1/keys/{path}"), None)
            .await;
        assert!(
            status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
            "{path}: {status} {body}"
        );
        assert!(body["error"].is_string(), "{path}: {body}");
        assert!(body["message"].is_string(), "{path}: {body}");
    }
    assert_eq!(count(&owner).await, (1, 0));
}

async fn key_endpoints_require_authentication(backend: Backend) {
    let server = TestServer::start(backend).await;
    let owner = TestDevice::register(&server).await;
    let stranger = TestDevice {
        password: "wrong-password-0123456789".into(),
        ..owner.clone()
    };
    assert_eq!(
        put_keys(&stranger, &valid(0)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = call(Method::PUT, &server.url("/v1/keys"), None, Some(&valid(0))).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        stranger
            .request(Method::GET, "/v1/keys/count", None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(owner.upload_vector(0).await, StatusCode::NO_CONTENT);
    assert_eq!(
        fetch(&stranger, &owner.uuid, "1").await.0,
        StatusCode::UNAUTHORIZED
    );
    // The refused fetch consumed nothing.
    assert_eq!(count(&owner).await, (1, 0));
}

/// A device's first upload must carry its signed prekey; once it has one,
/// later uploads may carry only one-time keys.
async fn first_upload_needs_a_signed_prekey(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let bare = json!({"identityKey": valid(0)["identityKey"], "preKeys": pre_keys(1..=3)});
    let (status, body) = alice.request(Method::PUT, "/v1/keys", Some(&bare)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "bad_request");
    let (_, counted) = alice.request(Method::GET, "/v1/keys/count", None).await;
    assert_eq!(
        counted["count"], 0,
        "nothing from the refused upload is stored"
    );
    assert_eq!(alice.upload_vector(0).await, StatusCode::NO_CONTENT);
    let (status, _) = alice.request(Method::PUT, "/v1/keys", Some(&bare)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, counted) = alice.request(Method::GET, "/v1/keys/count", None).await;
    assert_eq!(counted["count"], 4);
}

backends!(
    first_upload_needs_a_signed_prekey,
    every_valid_vector_is_accepted_and_served_back,
    every_invalid_vector_is_refused_and_nothing_is_stored,
    a_bad_key_anywhere_in_an_upload_stores_nothing,
    a_refused_upload_leaves_earlier_keys_untouched,
    linked_device_with_another_identity_key_gets_409,
    key_count_tracks_uploads_and_fetches,
    pq_one_time_key_is_issued_once_then_last_resort,
    one_time_keys_per_upload_are_limited_to_100,
    stored_one_time_keys_are_bounded_per_device,
    duplicate_key_ids_in_one_upload_are_400,
    malformed_key_material_is_422,
    malformed_json_is_400_with_error_body,
    wrong_json_types_are_400,
    one_time_key_issued_once_under_100_concurrent_fetches,
    one_time_key_issued_once_under_100_concurrent_fetches_of_all_devices,
    keys_stay_available_under_mixed_concurrent_load,
    one_time_keys_issued_once_across_two_servers_on_one_database,
    bundle_for_all_devices_lists_each_device,
    unknown_account_or_device_without_keys_is_404,
    malformed_bundle_path_is_refused_with_error_body,
    key_endpoints_require_authentication,
);
