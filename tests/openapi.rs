//! `GET /v1/openapi.json`: the document lists every route the server serves,
//! with its methods and its security; the server answers every other method
//! on those paths `405` with `Allow`; error bodies and schema bounds match
//! what the code does. (`.ci/run` also runs schemathesis against it.)

mod common;

use std::collections::BTreeSet;

use common::*;
use courier::domain::envelope::{MAX_CONTENT_BYTES, MAX_COPIES, REGISTRATION_ID_RANGE};
use courier::domain::keys::KeyError;
use courier::domain::prekeys::MAX_KEYS_PER_UPLOAD;
use courier::domain::secret::{MAX_SECRET_LEN, MIN_SECRET_LEN};
use courier::error::ApiError;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Every route of `http::configure`: path, method, whether it needs a device's credentials.
/// Every route, its method and how it is authenticated: `basic`, `none`,
/// `unidentified` (sealed sender's access key), or either of two (`|`;
/// `basic|none` is the WebSocket, whose unidentified connection has none).
const ROUTES: &[(&str, &str, &str)] = &[
    ("/healthz", "get", "none"),
    ("/readyz", "get", "none"),
    ("/metrics", "get", "none"),
    ("/v1/accounts", "post", "none"),
    ("/v1/accounts/me", "delete", "basic"),
    ("/v1/accounts/attributes", "put", "basic"),
    ("/v1/certificate/trust-root", "get", "none"),
    ("/v1/certificate/delivery", "get", "basic"),
    ("/v1/devices/provisioning", "post", "basic"),
    ("/v1/devices", "post", "none"),
    ("/v1/devices", "get", "basic"),
    ("/v1/devices/{device_id}", "delete", "basic"),
    ("/v1/keys", "put", "basic"),
    ("/v1/keys/count", "get", "basic"),
    ("/v1/keys/{uuid}/{device_id}", "get", "basic"),
    ("/v1/messages/{uuid}", "put", "basic|unidentified"),
    ("/v1/messages/{uuid}", "delete", "basic"),
    ("/v1/messages/multi_recipient", "put", "unidentified"),
    ("/v1/messages", "get", "basic"),
    ("/v1/websocket", "get", "basic|none"),
    ("/v1/rendezvous", "post", "basic"),
    ("/v1/rendezvous/{channel}", "get", "basic"),
    ("/v1/push/vapid-key", "get", "none"),
    ("/v1/push", "put", "basic"),
    ("/v1/push", "delete", "basic"),
    ("/v1/openapi.json", "get", "none"),
];

/// The WebSocket upgrades: their handshake's own 400 and 426 have no body.
const WEBSOCKETS: [&str; 2] = ["/v1/websocket", "/v1/rendezvous/{channel}"];

async fn document(server: &TestServer) -> Value {
    let res = http()
        .get(server.url("/v1/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::OK);
    let content_type = res.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let doc: Value = res.json().await.expect("the document is JSON");
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    doc
}

/// `#/components/<kind>/<name>` → that component.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).expect(r),
        None => value,
    }
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    &doc["components"]["schemas"][name]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_listed_with_its_methods_and_security() {
    let server = TestServer::start(Backend::Sqlite).await;
    let doc = document(&server).await;

    let basic = &doc["components"]["securitySchemes"]["basic"];
    assert_eq!(basic["type"], "http", "{basic}");
    assert_eq!(basic["scheme"], "basic", "{basic}");

    let listed: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (path.clone(), method.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(p, m, _)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(
        listed, expected,
        "documented routes differ from the route table"
    );

    for &(path, method, auth) in ROUTES {
        let op = &doc["paths"][path][method];
        let what = format!("{} {path}", method.to_uppercase());
        let security = op["security"].as_array().cloned().unwrap_or_default();
        let expected: Vec<Value> = match auth {
            "none" => Vec::new(),
            schemes => schemes
                .split('|')
                .map(|s| match s {
                    "none" => serde_json::json!({}),
                    s => serde_json::json!({ s: [] }),
                })
                .collect(),
        };
        assert_eq!(security, expected, "{what}: security");
        let authenticated = auth.starts_with("basic");
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2') || s == "101"),
            "{what}: a success status"
        );
        if authenticated {
            for status in ["401", "429", "500"] {
                assert!(responses.contains_key(status), "{what}: {status}");
            }
            let unauthorized = resolve(&doc, &responses["401"]);
            assert!(
                unauthorized["headers"]["WWW-Authenticate"].is_object(),
                "{what}: 401 carries WWW-Authenticate"
            );
        }
        if let Some(limited) = responses.get("429") {
            assert!(
                resolve(&doc, limited)["headers"]["Retry-After"].is_object(),
                "{what}: 429 carries Retry-After"
            );
        }
        // Every error answer is the one error body (the WebSocket handshake's
        // own 400 and 426 come from actix-http, without one).
        for (status, response) in responses {
            let response = resolve(&doc, response);
            let schema = &response["content"]["application/json"]["schema"];
            if path == "/v1/messages/multi_recipient" && ["409", "410"].contains(&status.as_str()) {
                // The SPEC's per-account list, as Signal-Server answers it.
                assert_eq!(schema["type"], "array", "{what}: {status}");
                assert_eq!(
                    schema["items"]["$ref"],
                    "#/components/schemas/AccountDevices"
                );
                continue;
            }
            let error_body = &schema["$ref"];
            if status.starts_with(['4', '5'])
                && !(WEBSOCKETS.contains(&path) && response["content"].is_null())
            {
                assert_eq!(
                    error_body, "#/components/schemas/ErrorBody",
                    "{what}: {status} body"
                );
            }
        }
        if op.get("requestBody").is_some() {
            for status in ["400", "413"] {
                assert!(
                    responses.contains_key(status),
                    "{what}: {status} for bad bodies"
                );
            }
        }
    }
    for path in WEBSOCKETS {
        let ws = doc["paths"][path]["get"]["responses"].as_object().unwrap();
        for status in ["101", "401", "503"] {
            assert!(ws.contains_key(status), "{path}: {status}");
        }
    }
    let join = doc["paths"]["/v1/rendezvous/{channel}"]["get"]["responses"]
        .as_object()
        .unwrap();
    for status in ["404", "409"] {
        assert!(join.contains_key(status), "rendezvous join: {status}");
    }
}

/// Each documented method is routed (never `405`, never the unknown-path
/// `404`); every other method on a documented path is `405` with `Allow`
/// naming exactly the documented ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_exactly_the_documented_methods() {
    let server = TestServer::start(Backend::Sqlite).await;
    let doc = document(&server).await;
    let client = http();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let documented: BTreeSet<String> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        let concrete = path
            .replace("{uuid}", "0191d5a4-3c5e-7b9a-8f00-000000000001")
            .replace("{device_id}", "2")
            .replace("{channel}", "12345678");
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            let res = client
                .request(
                    Method::from_bytes(method.as_bytes()).unwrap(),
                    server.url(&concrete),
                )
                .send()
                .await
                .expect("request");
            let status = res.status();
            let allow = res
                .headers()
                .get(reqwest::header::ALLOW)
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = res.json().await.unwrap_or(Value::Null);
            if documented.contains(method) {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                assert_ne!(body["message"], "no such endpoint", "{method} {path}");
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}: {body}"
                );
                assert_eq!(body["error"], "method_not_allowed", "{method} {path}");
                let allowed: BTreeSet<String> = allow
                    .expect("Allow")
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .collect();
                assert_eq!(allowed, documented, "{method} {path}: Allow");
            }
        }
    }
    let (status, body) = call(Method::GET, &server.url("/v1/nowhere"), None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found");
}

/// `ErrorBody` describes what `ApiError::body` writes: every field it can
/// write, the required ones always there, `error` one of the listed codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_body_schema_matches_the_bodies_errors_have() {
    let server = TestServer::start(Backend::Sqlite).await;
    let doc = document(&server).await;
    let error_body = schema(&doc, "ErrorBody");
    let properties = error_body["properties"].as_object().expect("properties");
    let codes = error_body["properties"]["error"]["enum"]
        .as_array()
        .expect("error codes");
    let required: Vec<&str> = error_body["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["error", "message"]);
    let errors = [
        ApiError::bad_request("x"),
        ApiError::Unauthorized,
        ApiError::Forbidden("x"),
        ApiError::NotFound("x"),
        ApiError::IdentityKeyMismatch,
        ApiError::NoIdentityKey,
        ApiError::ChannelFull,
        ApiError::MismatchedDevices {
            missing: vec![1],
            extra: vec![2],
        },
        ApiError::StaleDevices { stale: vec![3] },
        ApiError::TooLarge("x".into()),
        ApiError::InvalidKey(KeyError::Base64 { field: "x".into() }),
        ApiError::MethodNotAllowed {
            allow: "GET".into(),
        },
        ApiError::RateLimited {
            retry_after_secs: 5,
        },
        ApiError::MailboxFull,
        ApiError::Unavailable,
        ApiError::Internal,
    ];
    assert_eq!(codes.len(), errors.len(), "{codes:?}");
    for error in errors {
        let body = error.body();
        assert!(codes.contains(&body["error"]), "{body}: code not listed");
        for key in body.as_object().unwrap().keys() {
            assert!(
                properties.contains_key(key),
                "{body}: {key} not in ErrorBody"
            );
        }
    }
}

/// The bounds the schemas state are the rules the domain enforces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_bounds_are_the_domain_rules() {
    let server = TestServer::start(Backend::Sqlite).await;
    let doc = document(&server).await;
    let prop =
        |schema_name: &str, field: &str| schema(&doc, schema_name)["properties"][field].clone();

    for name in ["RegisterRequest", "LinkRequest"] {
        let password = prop(name, "password");
        assert_eq!(password["minLength"], MIN_SECRET_LEN, "{name}");
        assert_eq!(password["maxLength"], MAX_SECRET_LEN, "{name}");
        let registration_id = prop(name, "registrationId");
        assert_eq!(
            registration_id["minimum"],
            *REGISTRATION_ID_RANGE.start(),
            "{name}"
        );
        assert_eq!(
            registration_id["maximum"],
            *REGISTRATION_ID_RANGE.end(),
            "{name}"
        );
    }
    let message = prop("OutgoingMessage", "destinationRegistrationId");
    assert_eq!(message["minimum"], *REGISTRATION_ID_RANGE.start());
    assert_eq!(message["maximum"], *REGISTRATION_ID_RANGE.end());
    assert_eq!(
        prop("OutgoingMessage", "content")["maxLength"],
        MAX_CONTENT_BYTES.div_ceil(3) * 4
    );
    assert_eq!(prop("SendRequest", "messages")["maxItems"], MAX_COPIES);
    assert_eq!(
        prop("KeyUpload", "preKeys")["maxItems"],
        MAX_KEYS_PER_UPLOAD
    );
    assert_eq!(
        prop("KeyUpload", "pqPreKeys")["maxItems"],
        MAX_KEYS_PER_UPLOAD
    );
    assert_eq!(
        prop("OutgoingMessage", "destinationDeviceId")["maximum"],
        u32::MAX
    );

    let statuses: Vec<&str> = schema(&doc, "DeliveryStatus")["enum"]
        .as_array()
        .expect("DeliveryStatus enum")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["delivered", "queued", "dropped"]);
}
