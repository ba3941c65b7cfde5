//! Hostile input against a live server (SPEC "Errors": no input, however malformed, crashes the
//! server or corrupts stored data).
//!
//! proptest generates random bytes and plausible-but-wrong JSON (known field names with wrong
//! types, huge and negative numbers, long strings, deep arrays, bad base64, bad UUIDs, real key
//! material in the wrong places) for every endpoint, with and without valid credentials, and
//! random text, binary and fragmented WebSocket frames. Every answer must be a 2xx or a 4xx with
//! the SPEC's error body (a key upload that courier's own checks refuse, run locally, must not be
//! a 2xx), never a 5xx, never a dropped connection for one bad frame; each WebSocket message gets
//! the answer `parse_client_frame` predicts (a fragmented binary message: error frames). Afterwards
//! the keys uploaded at the start must be exactly as uploaded, less the one-time keys the test
//! itself saw handed out.
//!
//! One server per test function; proptest's runner is driven by hand on a blocking thread that
//! calls back into the test's runtime. `HOSTILE_CASES` overrides the number of cases.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier::domain::keys::{check_signed_ec_key, check_signed_kyber_key, ec_public_key};
use courier::domain::prekeys::check_upload;
use courier::wire::{parse_client_frame, ClientFrame, KeyUpload};
use futures_util::SinkExt;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::runtime::Handle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as RawFrame;
use tokio_tungstenite::tungstenite::Message;

use common::*;

/// Cases per property (each HTTP case is one request, each WebSocket case 1–4 frames).
const HTTP_CASES: u32 = 400;
const WS_CASES: u32 = 300;
/// One-time keys uploaded on top of each vector's own, so that fetches the generator happens
/// to aim at a real account leave something to count.
const EXTRA_EC_KEYS: u32 = 40;
const EXTRA_PQ_KEYS: u32 = 10;
/// The session closes a connection after this many consecutive unusable frames (+1).
const MAX_BAD_FRAMES: usize = 100;

fn cases(default: u32) -> u32 {
    std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases,
        // Each shrink step is a real request; keep a failure's report quick.
        max_shrink_iters: 200,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Fixture: two accounts, one device each, both with keys.

/// What one device uploaded at the start.
struct Uploaded {
    device: TestDevice,
    /// Its `valid[]` vector entry (identity key, signed prekey, Kyber last resort, preKeys).
    vector: Value,
    /// Every EC one-time public key uploaded (base64).
    one_time: BTreeSet<String>,
    /// `GET /v1/keys/count` right after the upload.
    count: (i64, i64),
}

struct Fixture {
    server: TestServer,
    alice: Uploaded,
    bob: Uploaded,
}

fn extra_ec_key(account: usize, n: u32) -> String {
    let mut key = [0x5Au8; 33];
    key[0] = 0x05;
    key[1] = account as u8;
    key[2..6].copy_from_slice(&n.to_le_bytes());
    b64(&key)
}

async fn upload_all(device: TestDevice, index: usize) -> Uploaded {
    assert_eq!(device.upload_vector(index).await, StatusCode::NO_CONTENT);
    let vector = vectors()["valid"][index].clone();
    let pq = &vector["pqLastResortPreKey"];
    let extra: Vec<String> = (0..EXTRA_EC_KEYS).map(|n| extra_ec_key(index, n)).collect();
    let body = json!({
        "identityKey": vector["identityKey"],
        "preKeys": extra.iter().enumerate()
            .map(|(n, k)| json!({"keyId": 1000 + n, "publicKey": k}))
            .collect::<Vec<_>>(),
        // The last-resort Kyber key under new ids: still validly signed by the identity key.
        "pqPreKeys": (0..EXTRA_PQ_KEYS)
            .map(|n| json!({"keyId": 300 + n, "publicKey": pq["publicKey"], "signature": pq["signature"]}))
            .collect::<Vec<_>>(),
    });
    let (status, answer) = device.request(Method::PUT, "/v1/keys", Some(&body)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "extra keys: {answer}");
    let mut one_time: BTreeSet<String> = extra.into_iter().collect();
    for k in vector["preKeys"].as_array().expect("preKeys") {
        one_time.insert(k["publicKey"].as_str().expect("publicKey").to_owned());
    }
    let count = key_count(&device).await;
    assert_eq!(count, (one_time.len() as i64, i64::from(EXTRA_PQ_KEYS)));
    Uploaded {
        device,
        vector,
        one_time,
        count,
    }
}

async fn fixture(backend: Backend) -> Fixture {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let bob = TestDevice::register(&server).await;
    Fixture {
        alice: upload_all(alice, 0).await,
        bob: upload_all(bob, 1).await,
        server,
    }
}

async fn key_count(device: &TestDevice) -> (i64, i64) {
    let (status, body) = device.request(Method::GET, "/v1/keys/count", None).await;
    assert_eq!(status, StatusCode::OK, "key count: {body}");
    (
        body["count"].as_i64().expect("count"),
        body["pqCount"].as_i64().expect("pqCount"),
    )
}

async fn assert_healthy(server: &TestServer) {
    let (status, _) = call(Method::GET, &server.url("/healthz"), None, None).await;
    assert_eq!(status, StatusCode::OK, "/healthz after hostile input");
}

/// One-time keys the test saw handed out, per identity key: `(ec, pq)`.
type Consumed = BTreeMap<String, (i64, i64)>;

/// Records what a `200` bundle handed out: one-time PQ keys are the ones whose id is not the
/// last-resort key's.
fn record_bundle(consumed: &mut Consumed, fixture_keys: &[(String, u64)], bundle: &Value) {
    let Some(identity) = bundle["identityKey"].as_str() else {
        return;
    };
    let last_resort = fixture_keys
        .iter()
        .find(|(id, _)| id == identity)
        .map(|(_, k)| *k);
    let entry = consumed.entry(identity.to_owned()).or_default();
    for d in bundle["devices"].as_array().into_iter().flatten() {
        if d.get("preKey").is_some() {
            entry.0 += 1;
        }
        if let Some(pq) = d.get("pqPreKey") {
            if pq["keyId"].as_u64() != last_resort {
                entry.1 += 1;
            }
        }
    }
}

/// Nothing was corrupted: per device, the key count is what was uploaded less what the test
/// saw handed out, the device list is unchanged, and a fresh bundle is the uploaded one and
/// verifies. Then a plain send still works.
async fn assert_intact(f: &Fixture, consumed: &Consumed) {
    for (owner, fetcher) in [(&f.alice, &f.bob), (&f.bob, &f.alice)] {
        let d = &owner.device;
        let identity_b64 = owner.vector["identityKey"].as_str().expect("identityKey");
        let (ec, pq) = consumed.get(identity_b64).copied().unwrap_or_default();
        let expected = (owner.count.0 - ec, owner.count.1 - pq);
        assert_eq!(key_count(d).await, expected, "{}: key count", d.login());

        let (status, devices) = d.request(Method::GET, "/v1/devices", None).await;
        assert_eq!(status, StatusCode::OK, "{devices}");
        let devices = devices.as_array().expect("device list");
        assert_eq!(devices.len(), 1, "{devices:?}");
        assert_eq!(devices[0]["deviceId"], 1);
        assert_eq!(devices[0]["registrationId"], d.registration_id);

        let (status, bundle) = fetcher
            .device
            .request(Method::GET, &format!("/v1/keys/{}/1", d.uuid), None)
            .await;
        assert_eq!(status, StatusCode::OK, "bundle: {bundle}");
        assert_eq!(bundle["identityKey"], owner.vector["identityKey"]);
        let devs = bundle["devices"].as_array().expect("devices");
        assert_eq!(devs.len(), 1, "{bundle}");
        let dev = &devs[0];
        assert_eq!(dev["deviceId"], 1);
        assert_eq!(dev["registrationId"], d.registration_id);
        assert_eq!(dev["signedPreKey"], owner.vector["signedPreKey"]);
        let identity = ec_public_key("identityKey", identity_b64).expect("identity key");
        let spk = &dev["signedPreKey"];
        check_signed_ec_key(
            &identity,
            "signedPreKey",
            spk["publicKey"].as_str().expect("publicKey"),
            spk["signature"].as_str().expect("signature"),
        )
        .expect("signed prekey verifies");
        let pq_key = &dev["pqPreKey"];
        assert_eq!(
            pq_key["publicKey"],
            owner.vector["pqLastResortPreKey"]["publicKey"]
        );
        check_signed_kyber_key(
            &identity,
            "pqPreKey",
            pq_key["publicKey"].as_str().expect("publicKey"),
            pq_key["signature"].as_str().expect("signature"),
        )
        .expect("PQ prekey verifies");
        if expected.0 > 0 {
            let pre = dev["preKey"]["publicKey"].as_str().expect("a one-time key");
            assert!(owner.one_time.contains(pre), "unknown one-time key {pre}");
        } else {
            assert!(dev.get("preKey").is_none(), "{bundle}");
        }
    }
    let (status, body) = f
        .alice
        .device
        .send(&f.bob.device.uuid, &[f.bob.device.target()], b"still works")
        .await;
    assert_eq!(status, StatusCode::OK, "send after hostile input: {body}");
    assert_healthy(&f.server).await;
}

// ---------------------------------------------------------------------------------------------
// JSON that is almost right.

/// A JSON text, built by hand so it can hold what `serde_json::Value` cannot: numbers past
/// `u64`/`f64`, duplicate keys, and raw (possibly invalid) text.
#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
    Raw(String),
}

impl J {
    fn write(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) | J::Raw(n) => out.push_str(n),
            J::Str(s) => out.push_str(&json!(s).to_string()),
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            J::Obj(members) => {
                out.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&json!(k).to_string());
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn from_value(v: &Value) -> J {
        match v {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Number(n) => J::Num(n.to_string()),
            Value::String(s) => J::Str(s.clone()),
            Value::Array(a) => J::Arr(a.iter().map(J::from_value).collect()),
            Value::Object(o) => J::Obj(
                o.iter()
                    .map(|(k, v)| (k.clone(), J::from_value(v)))
                    .collect(),
            ),
        }
    }

    fn nodes(&self) -> usize {
        1 + match self {
            J::Arr(items) => items.iter().map(J::nodes).sum(),
            J::Obj(members) => members.iter().map(|(_, v)| v.nodes()).sum(),
            _ => 0,
        }
    }

    /// Replaces the `n`th node in pre-order (0 is `self`).
    fn replace(&mut self, n: usize, with: J) {
        fn go(j: &mut J, n: &mut usize, with: &mut Option<J>) {
            if *n == 0 {
                if let Some(w) = with.take() {
                    *j = w;
                }
                return;
            }
            *n -= 1;
            let children: Vec<&mut J> = match j {
                J::Arr(items) => items.iter_mut().collect(),
                J::Obj(members) => members.iter_mut().map(|(_, v)| v).collect(),
                _ => Vec::new(),
            };
            for c in children {
                if with.is_none() {
                    return;
                }
                go(c, n, with);
            }
        }
        go(self, &mut { n }, &mut Some(with));
    }
}

/// A valid value with one node (never the root) replaced by anything at all, or, one time in
/// five, left valid.
fn near_miss(valid: BoxedStrategy<J>, ctx: &Ctx) -> BoxedStrategy<J> {
    (
        valid,
        any::<prop::sample::Index>(),
        value(ctx),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(mut j, at, with, keep)| {
            let nodes = j.nodes();
            if !keep && nodes > 1 {
                j.replace(1 + at.index(nodes - 1), with);
            }
            j
        })
        .boxed()
}

/// Real values the generators mix in, so that some inputs get past the first checks.
#[derive(Debug, Clone)]
struct Ctx {
    uuids: Vec<String>,
    registration_ids: Vec<i64>,
    /// Valid EC public keys (identity and signed prekeys of the vectors).
    ec_keys: Vec<String>,
    identities: Vec<String>,
    /// `(publicKey, signature)` of the vectors' signed prekeys: valid pairs.
    signed_pairs: Vec<(String, String)>,
    kyber_pairs: Vec<(String, String)>,
    /// The uploads the fixture made (`valid[0]` for alice, `valid[1]` for bob).
    uploads: Vec<Value>,
}

impl Ctx {
    fn new(uuids: Vec<String>, registration_ids: Vec<i64>) -> Ctx {
        let v = vectors();
        let valid = v["valid"].as_array().expect("valid[]");
        let s = |v: &Value| v.as_str().expect("vector string").to_owned();
        let pair = |k: &Value| (s(&k["publicKey"]), s(&k["signature"]));
        Ctx {
            uuids,
            registration_ids,
            ec_keys: valid
                .iter()
                .flat_map(|e| [s(&e["identityKey"]), s(&e["signedPreKey"]["publicKey"])])
                .collect(),
            identities: valid.iter().map(|e| s(&e["identityKey"])).collect(),
            signed_pairs: valid.iter().map(|e| pair(&e["signedPreKey"])).collect(),
            kyber_pairs: valid
                .iter()
                .map(|e| pair(&e["pqLastResortPreKey"]))
                .collect(),
            uploads: valid[..2].to_vec(),
        }
    }
}

const FIELD_NAMES: &[&str] = &[
    "password",
    "registrationId",
    "registrationToken",
    "code",
    "identityKey",
    "signedPreKey",
    "preKeys",
    "pqLastResortPreKey",
    "pqPreKeys",
    "keyId",
    "publicKey",
    "signature",
    "timestamp",
    "online",
    "messages",
    "destinationDeviceId",
    "destinationRegistrationId",
    "type",
    "content",
    "op",
    "id",
    "destination",
    "guid",
    "",
    "__proto__",
];

fn field_name() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(FIELD_NAMES).prop_map(String::from),
        1 => any::<String>(),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<String> {
    prop_oneof![
        4 => (-20i64..20_000).prop_map(|n| n.to_string()),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        3 => select(vec![
            "0", "-0", "1", "-1", "16380", "16381", "4294967295", "4294967296",
            "9223372036854775807", "9223372036854775808", "-9223372036854775809",
            "18446744073709551615", "18446744073709551616", "1e999", "-1e999", "1.0", "0.5",
            "1E2", "123456789012345678901234567890", "00", "+1", "0x10", "NaN", "Infinity",
        ])
        .prop_map(String::from),
    ]
    .boxed()
}

fn uuid_like(ctx: &Ctx) -> BoxedStrategy<String> {
    let real = select(ctx.uuids.clone());
    prop_oneof![
        3 => real.clone(),
        1 => real.clone().prop_map(|u| u.to_uppercase()),
        1 => real.clone().prop_map(|u| u.replace('-', "")),
        1 => real.clone().prop_map(|u| format!("{{{u}}}")),
        1 => real.clone().prop_map(|u| format!("urn:uuid:{u}")),
        1 => real.clone().prop_map(|u| format!("{u}.1")),
        1 => real.prop_map(|u| u[..35].to_owned()),
        2 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).hyphenated().to_string()),
        1 => "[0-9a-fA-FgG-]{36}",
    ]
    .boxed()
}

fn raw_b64(len: std::ops::Range<usize>, prefix: Option<u8>) -> BoxedStrategy<String> {
    vec(any::<u8>(), len)
        .prop_map(move |mut b| {
            if let Some(p) = prefix {
                b.insert(0, p);
            }
            b64(&b)
        })
        .boxed()
}

fn invalid_base64() -> BoxedStrategy<String> {
    prop_oneof![
        select(vec![
            "not base64!",
            "AQ",
            "AQ=",
            "AQ===",
            "AR==",
            "-_-_",
            "BQ==\n",
            " BQ==",
            "====",
            "QQ==QQ==",
            "\u{e9}\u{e9}\u{e9}\u{e9}",
        ])
        .prop_map(String::from),
        // A valid string with one character broken or its padding dropped.
        (
            raw_b64(1..70, None),
            any::<prop::sample::Index>(),
            "[^A-Za-z0-9+/=]"
        )
            .prop_map(|(s, i, c)| {
                let mut chars: Vec<char> = s.chars().collect();
                let at = i.index(chars.len());
                chars[at] = c.chars().next().unwrap_or('!');
                chars.into_iter().collect()
            }),
        raw_b64(1..70, None).prop_map(|s| s.trim_end_matches('=').to_owned()),
        raw_b64(1..70, None).prop_map(|s| s.replace('+', "-").replace('/', "_")),
    ]
    .boxed()
}

/// Key material: real keys and signatures from the vectors, well-shaped random ones, and
/// broken ones.
fn key_like(ctx: &Ctx) -> BoxedStrategy<String> {
    prop_oneof![
        2 => select(ctx.ec_keys.clone()),
        1 => select(ctx.signed_pairs.clone()).prop_map(|(_, s)| s),
        1 => select(ctx.kyber_pairs.clone()).prop_map(|(k, _)| k),
        2 => raw_b64(32..33, Some(0x05)),
        1 => raw_b64(32..33, Some(0x06)),
        1 => raw_b64(31..35, Some(0x05)),
        1 => raw_b64(64..65, None),
        1 => raw_b64(1568..1569, Some(0x08)),
        2 => invalid_base64(),
    ]
    .boxed()
}

fn text(ctx: &Ctx) -> BoxedStrategy<String> {
    prop_oneof![
        3 => any::<String>(),
        1 => vec(any::<char>(), 0..24).prop_map(String::from_iter),
        2 => "[ -~]{0,40}",
        2 => raw_b64(0..80, None),
        2 => key_like(ctx),
        2 => uuid_like(ctx),
        1 => invalid_base64(),
        1 => select(vec![1_000usize, 70_000, 350_000]).prop_map(|n| "A".repeat(n)),
    ]
    .boxed()
}

fn value(ctx: &Ctx) -> BoxedStrategy<J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        number().prop_map(J::Num),
        text(ctx).prop_map(J::Str),
        (1usize..400).prop_map(|d| J::Raw(format!("{}{}", "[".repeat(d), "]".repeat(d)))),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(J::Arr),
            vec((field_name(), inner), 0..5).prop_map(J::Obj),
        ]
    })
    .boxed()
}

/// A named member: usually a plausible value, sometimes anything at all, sometimes absent.
fn member(
    name: &'static str,
    good: BoxedStrategy<J>,
    ctx: &Ctx,
) -> BoxedStrategy<Option<(String, J)>> {
    prop_oneof![
        10 => good.prop_map(move |v| Some((name.to_owned(), v))),
        2 => value(ctx).prop_map(move |v| Some((name.to_owned(), v))),
        1 => Just(None),
    ]
    .boxed()
}

/// An object of the given members, sometimes with one repeated and sometimes with strays.
fn object(members: Vec<BoxedStrategy<Option<(String, J)>>>, ctx: &Ctx) -> BoxedStrategy<J> {
    (
        members,
        prop::bool::weighted(0.1),
        prop_oneof![4 => Just(Vec::new()), 1 => vec((field_name(), value(ctx)), 1..3)],
    )
        .prop_map(|(members, repeat, strays)| {
            let mut all: Vec<(String, J)> = members.into_iter().flatten().collect();
            if repeat {
                if let Some(first) = all.first().cloned() {
                    all.push(first);
                }
            }
            all.extend(strays);
            J::Obj(all)
        })
        .boxed()
}

fn num_in(range: std::ops::RangeInclusive<i64>) -> BoxedStrategy<J> {
    range.prop_map(|n| J::Num(n.to_string())).boxed()
}

fn str_of(s: BoxedStrategy<String>) -> BoxedStrategy<J> {
    s.prop_map(J::Str).boxed()
}

fn registration_id(ctx: &Ctx) -> BoxedStrategy<J> {
    prop_oneof![
        1 => num_in(1..=16380),
        2 => select(ctx.registration_ids.clone()).prop_map(|n| J::Num(n.to_string())),
        1 => number().prop_map(J::Num),
    ]
    .boxed()
}

fn password() -> BoxedStrategy<J> {
    prop_oneof![3 => "[ -~]{16,64}", 1 => "[ -~]{0,20}", 1 => "\\PC{10,40}"]
        .prop_map(J::Str)
        .boxed()
}

fn register_body(ctx: &Ctx) -> BoxedStrategy<J> {
    object(
        vec![
            member("password", password(), ctx),
            member("registrationId", registration_id(ctx), ctx),
            member("registrationToken", str_of(text(ctx)), ctx),
        ],
        ctx,
    )
}

fn link_body(ctx: &Ctx) -> BoxedStrategy<J> {
    object(
        vec![
            member(
                "code",
                str_of(prop_oneof![raw_b64(16..17, None), text(ctx)].boxed()),
                ctx,
            ),
            member("password", password(), ctx),
            member("registrationId", registration_id(ctx), ctx),
        ],
        ctx,
    )
}

fn key_id() -> BoxedStrategy<J> {
    prop_oneof![
        num_in(0..=5000),
        any::<u32>().prop_map(|n| J::Num(n.to_string()))
    ]
    .boxed()
}

/// `{keyId, publicKey, signature}`: often a real signed pair, often not.
fn signed_key(ctx: &Ctx, kyber: bool) -> BoxedStrategy<J> {
    let pairs = if kyber {
        ctx.kyber_pairs.clone()
    } else {
        ctx.signed_pairs.clone()
    };
    let real = (key_id(), select(pairs)).prop_map(|(id, (k, s))| {
        J::Obj(vec![
            ("keyId".into(), id),
            ("publicKey".into(), J::Str(k)),
            ("signature".into(), J::Str(s)),
        ])
    });
    let made = object(
        vec![
            member("keyId", key_id(), ctx),
            member("publicKey", str_of(key_like(ctx)), ctx),
            member("signature", str_of(key_like(ctx)), ctx),
        ],
        ctx,
    );
    prop_oneof![real, made].boxed()
}

fn upload_body(ctx: &Ctx) -> BoxedStrategy<J> {
    let pre_key = object(
        vec![
            member("keyId", key_id(), ctx),
            member("publicKey", str_of(key_like(ctx)), ctx),
        ],
        ctx,
    );
    let list = |item: BoxedStrategy<J>| -> BoxedStrategy<J> {
        prop_oneof![
            9 => vec(item.clone(), 0..4).prop_map(J::Arr),
            1 => vec(item, 101..=101).prop_map(J::Arr),
        ]
        .boxed()
    };
    object(
        vec![
            member(
                "identityKey",
                str_of(prop_oneof![select(ctx.identities.clone()), key_like(ctx)].boxed()),
                ctx,
            ),
            member("signedPreKey", signed_key(ctx, false), ctx),
            member("preKeys", list(pre_key), ctx),
            member("pqLastResortPreKey", signed_key(ctx, true), ctx),
            member("pqPreKeys", list(signed_key(ctx, true)), ctx),
        ],
        ctx,
    )
}

/// The members of a send body (HTTP body, or the rest of a WebSocket `send` frame).
fn send_members(ctx: &Ctx) -> Vec<BoxedStrategy<Option<(String, J)>>> {
    let copy = object(
        vec![
            member(
                "destinationDeviceId",
                prop_oneof![3 => num_in(1..=1), 1 => num_in(0..=4)].boxed(),
                ctx,
            ),
            member("destinationRegistrationId", registration_id(ctx), ctx),
            member("type", num_in(-2..=8), ctx),
            member(
                "content",
                str_of(prop_oneof![3 => raw_b64(1..64, None), 1 => text(ctx)].boxed()),
                ctx,
            ),
        ],
        ctx,
    );
    vec![
        member("timestamp", num_in(0..=1_800_000_000_000), ctx),
        member("online", any::<bool>().prop_map(J::Bool).boxed(), ctx),
        member("messages", vec(copy, 0..3).prop_map(J::Arr).boxed(), ctx),
    ]
}

fn send_body_j(ctx: &Ctx) -> BoxedStrategy<J> {
    prop_oneof![
        1 => object(send_members(ctx), ctx),
        2 => near_miss(valid_send(ctx, false), ctx),
    ]
    .boxed()
}

/// A send that the server accepts when alice sends it to the account it names (as an HTTP body,
/// or as a `send` frame when `frame`).
fn valid_send(ctx: &Ctx, frame: bool) -> BoxedStrategy<J> {
    let (uuids, regs) = (ctx.uuids.clone(), ctx.registration_ids.clone());
    (
        0..uuids.len(),
        0i64..2_000_000_000_000,
        any::<Option<bool>>(),
        vec(any::<u8>(), 1..64),
        0u32..1000,
    )
        .prop_map(move |(to, timestamp, online, content, id)| {
            let mut body = json!({
                "timestamp": timestamp,
                "messages": [{
                    "destinationDeviceId": 1,
                    "destinationRegistrationId": regs[to],
                    "type": 1,
                    "content": b64(&content),
                }],
            });
            if let Some(online) = online {
                body["online"] = json!(online);
            }
            if frame {
                body["op"] = json!("send");
                body["id"] = json!(id);
                body["destination"] = json!(uuids[to]);
            }
            J::from_value(&body)
        })
        .boxed()
}

fn valid_register() -> BoxedStrategy<J> {
    ("[!-~]{16,64}", 1i64..=16380)
        .prop_map(|(password, id)| {
            J::from_value(&json!({"password": password, "registrationId": id}))
        })
        .boxed()
}

/// A WebSocket client frame: a `send`, an `ack`, or something else with an `op`.
fn frame_j(ctx: &Ctx) -> BoxedStrategy<J> {
    let op = |ops: &'static [&'static str]| -> BoxedStrategy<J> {
        prop_oneof![
            5 => select(ops).prop_map(|o| J::Str(o.to_owned())),
            1 => text(ctx).prop_map(J::Str),
        ]
        .boxed()
    };
    let id = prop_oneof![3 => num_in(0..=1000), 1 => number().prop_map(J::Num)].boxed();
    let mut send = vec![
        member("op", op(&["send"]), ctx),
        member("id", id.clone(), ctx),
        member("destination", str_of(uuid_like(ctx)), ctx),
    ];
    send.extend(send_members(ctx));
    prop_oneof![
        3 => object(send, ctx),
        3 => near_miss(valid_send(ctx, true), ctx),
        1 => object(
            vec![member("op", op(&["ack"]), ctx), member("guid", str_of(uuid_like(ctx)), ctx)],
            ctx,
        ),
        1 => object(
            vec![member("op", op(&["SEND", "Ack", "", "message", "response"]), ctx), member("id", id, ctx)],
            ctx,
        ),
    ]
    .boxed()
}

/// Bytes for a body: plausible JSON, a prefix of it, or noise.
fn bytes_from(json: BoxedStrategy<J>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        6 => json.clone().prop_map(|j| j.text().into_bytes()),
        1 => (json, any::<prop::sample::Index>()).prop_map(|(j, i)| {
            let mut b = j.text().into_bytes();
            b.truncate(i.index(b.len() + 1));
            b
        }),
        1 => vec(any::<u8>(), 0..300),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// HTTP.

#[derive(Debug, Clone)]
enum Endpoint {
    Register,
    Link,
    UploadKeys,
    Send(String),
    Ack(String),
    Bundle(String, String),
    DeleteDevice(String),
}

#[derive(Debug, Clone)]
enum Auth {
    None,
    Alice,
    Bob,
    /// Alice's login, wrong password.
    WrongPassword,
    /// Any header value; never a valid credential.
    Header(String),
}

#[derive(Clone)]
struct HttpCase {
    endpoint: Endpoint,
    auth: Auth,
    content_type: Option<String>,
    body: Option<Vec<u8>>,
}

impl std::fmt::Debug for HttpCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = self.body.as_ref().map(|b| {
            let s = String::from_utf8_lossy(b);
            if s.chars().count() > 2000 {
                let head: String = s.chars().take(2000).collect();
                format!("{head}… ({} bytes)", b.len())
            } else {
                s.into_owned()
            }
        });
        f.debug_struct("HttpCase")
            .field("endpoint", &self.endpoint)
            .field("auth", &self.auth)
            .field("content_type", &self.content_type)
            .field("body", &body)
            .finish()
    }
}

impl Endpoint {
    fn method_path(&self) -> (Method, String) {
        let seg = |s: &str| percent_segment(s);
        match self {
            Endpoint::Register => (Method::POST, "/v1/accounts".into()),
            Endpoint::Link => (Method::POST, "/v1/devices".into()),
            Endpoint::UploadKeys => (Method::PUT, "/v1/keys".into()),
            Endpoint::Send(u) => (Method::PUT, format!("/v1/messages/{}", seg(u))),
            Endpoint::Ack(g) => (Method::DELETE, format!("/v1/messages/{}", seg(g))),
            Endpoint::Bundle(u, d) => (Method::GET, format!("/v1/keys/{}/{}", seg(u), seg(d))),
            Endpoint::DeleteDevice(d) => (Method::DELETE, format!("/v1/devices/{}", seg(d))),
        }
    }
}

/// Percent-encodes all but unreserved characters, `*` (which the bundle path uses) and `%` (so
/// generators can write their own escapes, valid or not).
fn percent_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'*' | b'%' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn device_seg() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(vec!["1", "*"]).prop_map(String::from),
        3 => select(vec!["2", "0", "-1", "01", "+1", " 1", "1.5", "4294967295", "4294967296",
            "99999999999999999999", "", "**", "1*", "%", "%zz", "%00", "%2F", "..", "."])
            .prop_map(String::from),
        1 => any::<u32>().prop_map(|n| n.to_string()),
        1 => any::<String>(),
        // Percent-encoded bytes, mostly not UTF-8 (`percent_segment` leaves `%` alone).
        1 => vec(any::<u8>(), 1..6).prop_map(|b| b.iter().map(|b| format!("%{b:02X}")).collect()),
    ]
    .boxed()
}

fn path_seg(ctx: &Ctx) -> BoxedStrategy<String> {
    prop_oneof![3 => uuid_like(ctx), 1 => device_seg(), 1 => text(ctx).prop_map(|s| s.chars().take(80).collect())]
        .boxed()
}

fn auth_header(ctx: &Ctx) -> BoxedStrategy<String> {
    let login = (
        uuid_like(ctx),
        prop_oneof![
            Just(String::new()),
            device_seg().prop_map(|d| format!(".{d}"))
        ],
    )
        .prop_map(|(u, d)| format!("{u}{d}"));
    prop_oneof![
        "[ -~]{0,60}",
        raw_b64(0..40, None).prop_map(|b| format!("Basic {b}")),
        (login, "[ -~]{0,30}")
            .prop_map(|(l, p)| format!("Basic {}", b64(format!("{l}:{p}").as_bytes()))),
        vec(any::<u8>(), 0..40).prop_map(|b| format!("Basic {}", b64(&b))),
        select(vec![
            "Basic",
            "Basic ",
            "Basic =",
            "Bearer abc",
            "Basic Og==",
            "basic Og=="
        ])
        .prop_map(String::from),
    ]
    .boxed()
}

fn http_case(ctx: &Ctx) -> BoxedStrategy<HttpCase> {
    let endpoint = prop_oneof![
        1 => Just(Endpoint::Register),
        1 => Just(Endpoint::Link),
        2 => Just(Endpoint::UploadKeys),
        2 => prop_oneof![2 => select(ctx.uuids.clone()), 1 => uuid_like(ctx)].prop_map(Endpoint::Send),
        1 => path_seg(ctx).prop_map(Endpoint::Ack),
        2 => (prop_oneof![3 => uuid_like(ctx), 1 => path_seg(ctx)], device_seg())
            .prop_map(|(u, d)| Endpoint::Bundle(u, d)),
        1 => device_seg().prop_map(Endpoint::DeleteDevice),
    ];
    let auth = prop_oneof![
        2 => Just(Auth::None),
        3 => Just(Auth::Alice),
        1 => Just(Auth::Bob),
        1 => Just(Auth::WrongPassword),
        1 => auth_header(ctx).prop_map(Auth::Header),
    ];
    let content_type = prop_oneof![
        6 => Just(Some("application/json".to_owned())),
        1 => Just(None),
        1 => select(vec!["text/plain", "application/json; charset=utf-8", "application/x-www-form-urlencoded",
            "application/problem+json", "multipart/form-data; boundary=x", ""]).prop_map(|s| Some(s.to_owned())),
        1 => "[ -~]{0,30}".prop_map(Some),
    ];
    let any_body = prop_oneof![
        register_body(ctx),
        link_body(ctx),
        upload_body(ctx),
        send_body_j(ctx),
        value(ctx),
    ]
    .boxed();
    let (register, link, upload, send, other) = (
        bytes_from(prop_oneof![register_body(ctx), near_miss(valid_register(), ctx)].boxed()),
        bytes_from(link_body(ctx)),
        bytes_from(
            prop_oneof![
                upload_body(ctx),
                near_miss(
                    select(ctx.uploads.clone())
                        .prop_map(|v| J::from_value(&v))
                        .boxed(),
                    ctx
                ),
            ]
            .boxed(),
        ),
        bytes_from(send_body_j(ctx)),
        bytes_from(any_body),
    );
    (
        endpoint,
        auth,
        content_type,
        register,
        link,
        upload,
        send,
        other,
        0u8..10,
    )
        .prop_map(
            |(endpoint, auth, content_type, register, link, upload, send, other, pick)| {
                // Mostly the body the endpoint expects; sometimes another endpoint's or none.
                let own = match &endpoint {
                    Endpoint::Register => Some(register),
                    Endpoint::Link => Some(link),
                    Endpoint::UploadKeys => Some(upload),
                    Endpoint::Send(_) => Some(send),
                    _ => None,
                };
                let body = match (pick, own) {
                    (0..=6, Some(own)) => Some(own),
                    (0..=6, None) | (7..=8, _) => (pick % 2 == 0).then_some(other),
                    _ => None,
                };
                HttpCase {
                    endpoint,
                    auth,
                    content_type,
                    body,
                }
            },
        )
        .boxed()
}

/// What a key upload would do if the server took it, judged with the server's own checks.
#[derive(Debug, PartialEq)]
enum UploadEffect {
    /// Refused: the answer must be a 4xx and nothing may change.
    Refused,
    /// Accepted but changes nothing stored (e.g. the identity key alone).
    NoChange,
    /// Would legitimately change the stored keys: not sent, so the final check stays exact.
    Changes,
}

fn upload_effect(body: Option<&[u8]>, owner: &Uploaded) -> UploadEffect {
    let Some(upload) = body.and_then(|b| serde_json::from_slice::<KeyUpload>(b).ok()) else {
        return UploadEffect::Refused;
    };
    let Ok(keys) = check_upload(upload.into()) else {
        return UploadEffect::Refused;
    };
    let v = &owner.vector;
    if b64(&keys.identity_key) != v["identityKey"] {
        return UploadEffect::Refused;
    }
    let same = |stored: &Value, key: &courier::domain::prekeys::SignedKey| {
        stored["keyId"] == key.key_id
            && stored["publicKey"] == b64(&key.public_key)
            && stored["signature"] == b64(&key.signature)
    };
    let unchanged = keys.one_time.is_empty()
        && keys.pq_one_time.is_empty()
        && keys
            .signed_pre_key
            .as_ref()
            .is_none_or(|k| same(&v["signedPreKey"], k))
        && keys
            .pq_last_resort
            .as_ref()
            .is_none_or(|k| same(&v["pqLastResortPreKey"], k));
    if unchanged {
        UploadEffect::NoChange
    } else {
        UploadEffect::Changes
    }
}

/// Sends one case; `Err` when the server did not answer at all.
async fn execute(
    client: &reqwest::Client,
    f: &Fixture,
    case: &HttpCase,
) -> Result<(StatusCode, Vec<u8>), String> {
    let (method, path) = case.endpoint.method_path();
    let mut req = client.request(method, f.server.url(&path));
    let basic = |d: &TestDevice, password: &str| {
        format!(
            "Basic {}",
            b64(format!("{}:{password}", d.login()).as_bytes())
        )
    };
    let auth = match &case.auth {
        Auth::None => None,
        Auth::Alice => Some(basic(&f.alice.device, &f.alice.device.password)),
        Auth::Bob => Some(basic(&f.bob.device, &f.bob.device.password)),
        Auth::WrongPassword => Some(basic(&f.alice.device, "wrong-password-0123456789")),
        Auth::Header(h) => Some(h.clone()),
    };
    if let Some(a) = auth {
        req = req.header(AUTHORIZATION, a);
    }
    if let Some(ct) = &case.content_type {
        req = req.header(CONTENT_TYPE, ct);
    }
    if let Some(b) = &case.body {
        req = req.body(b.clone());
    }
    let res = req.send().await.map_err(|e| format!("no answer: {e}"))?;
    let status = res.status();
    let body = res
        .bytes()
        .await
        .map_err(|e| format!("body cut off: {e}"))?;
    Ok((status, body.to_vec()))
}

/// Every 4xx carries `{"error": string, "message": string}`.
fn check_error_body(status: StatusCode, body: &[u8]) -> Result<Value, TestCaseError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        TestCaseError::fail(format!(
            "{status} body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        ))
    })?;
    prop_assert!(
        v["error"].is_string() && v["message"].is_string(),
        "{status} body lacks error/message: {v}"
    );
    Ok(v)
}

async fn http_endpoints_survive_hostile_bodies(backend: Backend) {
    let f = fixture(backend).await;
    let ctx = Ctx::new(
        vec![f.alice.device.uuid.clone(), f.bob.device.uuid.clone()],
        vec![f.alice.device.registration_id, f.bob.device.registration_id],
    );
    let last_resort: Vec<(String, u64)> = [&f.alice, &f.bob]
        .iter()
        .map(|u| {
            (
                u.vector["identityKey"]
                    .as_str()
                    .expect("identityKey")
                    .to_owned(),
                u.vector["pqLastResortPreKey"]["keyId"]
                    .as_u64()
                    .expect("keyId"),
            )
        })
        .collect();
    let handle = Handle::current();
    let total = cases(HTTP_CASES);
    let (f, consumed, stats) = tokio::task::spawn_blocking(move || {
        let client = http();
        let consumed = RefCell::new(Consumed::new());
        let statuses = RefCell::new(BTreeMap::<u16, u32>::new());
        let skipped = Cell::new(0u32);
        let strategy = http_case(&ctx);
        let result = runner(total).run(&strategy, |case| {
            let owner = match case.auth {
                Auth::Alice => Some(&f.alice),
                Auth::Bob => Some(&f.bob),
                _ => None,
            };
            let effect = match (&case.endpoint, owner) {
                (Endpoint::UploadKeys, Some(owner)) => upload_effect(case.body.as_deref(), owner),
                _ => UploadEffect::NoChange,
            };
            if effect == UploadEffect::Changes {
                skipped.set(skipped.get() + 1);
                return Ok(());
            }
            let (status, body) = handle
                .block_on(execute(&client, &f, &case))
                .map_err(TestCaseError::fail)?;
            *statuses.borrow_mut().entry(status.as_u16()).or_default() += 1;
            prop_assert!(
                !status.is_server_error(),
                "{status}: {}",
                String::from_utf8_lossy(&body)
            );
            prop_assert!(
                status.is_success() || status.is_client_error(),
                "unexpected status {status}"
            );
            if status.is_client_error() {
                check_error_body(status, &body)?;
            }
            if effect == UploadEffect::Refused && matches!(case.endpoint, Endpoint::UploadKeys) {
                prop_assert!(
                    !status.is_success(),
                    "a refused upload was accepted: {status}"
                );
            }
            if matches!(case.endpoint, Endpoint::Bundle(..)) && status == StatusCode::OK {
                let bundle: Value = serde_json::from_slice(&body)
                    .map_err(|e| TestCaseError::fail(format!("bundle is not JSON: {e}")))?;
                record_bundle(&mut consumed.borrow_mut(), &last_resort, &bundle);
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("hostile HTTP input: {e}");
        }
        let stats = format!(
            "{total} cases, {} not sent (valid uploads that would change keys), statuses {:?}",
            skipped.get(),
            statuses.borrow()
        );
        (f, consumed.into_inner(), stats)
    })
    .await
    .expect("property thread");
    eprintln!("{backend:?} HTTP: {stats}; one-time keys handed out {consumed:?}");
    assert_intact(&f, &consumed).await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket.

#[derive(Clone)]
enum WsOut {
    Text(String),
    Binary(Vec<u8>),
    /// One message in `parts.len()` (≥ 2) frames: first text or binary, then continuations.
    Fragmented {
        text: bool,
        parts: Vec<Vec<u8>>,
    },
}

impl std::fmt::Debug for WsOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsOut::Text(t) => write!(f, "Text({t:?})"),
            WsOut::Binary(b) => write!(f, "Binary({:?})", String::from_utf8_lossy(b)),
            WsOut::Fragmented { text, parts } => write!(
                f,
                "Fragmented {{ text: {text}, parts: {:?} }}",
                parts
                    .iter()
                    .map(|p| String::from_utf8_lossy(p))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// What the session must answer to one message.
#[derive(Debug)]
enum Expect {
    /// `{"op":"error","message":…}`.
    Error,
    /// `{"op":"response","id":id,…}`, with this status if known.
    Response(Value, Option<u16>),
    /// An `ack`: no answer.
    Nothing,
    /// A fragmented binary message: at least one error frame (today one per fragment).
    SomeErrors,
}

impl Expect {
    fn kind(&self) -> &'static str {
        match self {
            Expect::Error => "error",
            Expect::Response(_, Some(_)) => "400 response",
            Expect::Response(_, None) => "send response",
            Expect::Nothing => "ack (no answer)",
            Expect::SomeErrors => "fragmented binary",
        }
    }
}

fn expect_for_text(text: &str) -> Expect {
    match parse_client_frame(text) {
        ClientFrame::Unusable(_) => Expect::Error,
        ClientFrame::InvalidSend { id, .. } => Expect::Response(Value::Number(id), Some(400)),
        ClientFrame::Send { id, .. } => Expect::Response(Value::Number(id), None),
        ClientFrame::Ack { .. } => Expect::Nothing,
    }
}

impl WsOut {
    fn expect(&self) -> Expect {
        match self {
            WsOut::Text(t) => expect_for_text(t),
            WsOut::Binary(_) => Expect::Error,
            WsOut::Fragmented { text: false, .. } => Expect::SomeErrors,
            WsOut::Fragmented { text: true, parts } => match String::from_utf8(parts.concat()) {
                Ok(t) => expect_for_text(&t),
                Err(_) => Expect::Error,
            },
        }
    }
}

fn split_into(bytes: Vec<u8>, cuts: Vec<prop::sample::Index>) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut parts = Vec::new();
    let mut from = 0;
    for a in at {
        parts.push(bytes[from..a].to_vec());
        from = a;
    }
    parts.push(bytes[from..].to_vec());
    parts
}

fn ws_out(ctx: &Ctx) -> BoxedStrategy<WsOut> {
    let frame_text = prop_oneof![
        10 => frame_j(ctx).prop_map(|j| j.text()),
        1 => (frame_j(ctx), any::<prop::sample::Index>()).prop_map(|(j, i)| {
            let t = j.text();
            let mut cut = i.index(t.len() + 1);
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t[..cut].to_owned()
        }),
        1 => value(ctx).prop_map(|j| j.text()),
        1 => any::<String>(),
    ]
    .boxed();
    let payload = prop_oneof![
        3 => frame_text.clone().prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..200),
    ];
    prop_oneof![
        6 => frame_text.prop_map(WsOut::Text),
        2 => payload.clone().prop_map(WsOut::Binary),
        2 => (any::<bool>(), payload, vec(any::<prop::sample::Index>(), 1..4))
            .prop_map(|(text, bytes, cuts)| WsOut::Fragmented { text, parts: split_into(bytes, cuts) }),
    ]
    .boxed()
}

async fn send_out(ws: &mut Ws, out: &WsOut) -> Result<(), String> {
    let frames: Vec<Message> = match out {
        WsOut::Text(t) => vec![Message::Text(t.clone())],
        WsOut::Binary(b) => vec![Message::Binary(b.clone())],
        WsOut::Fragmented { text, parts } => {
            let last = parts.len() - 1;
            parts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let data = match (i, text) {
                        (0, true) => Data::Text,
                        (0, false) => Data::Binary,
                        _ => Data::Continue,
                    };
                    Message::Frame(RawFrame::message(p.clone(), OpCode::Data(data), i == last))
                })
                .collect()
        }
    };
    for m in frames {
        ws.stream
            .send(m)
            .await
            .map_err(|e| format!("socket write failed: {e}"))?;
    }
    Ok(())
}

/// The next frame that is not a push (`message`, `queue-empty`); pushes are acknowledged.
async fn next_answer(ws: &mut Ws) -> Result<Value, String> {
    loop {
        match ws.next_within(Duration::from_secs(10)).await {
            None => return Err("no answer within 10 s".into()),
            Some(Frame::Closed(code)) => return Err(format!("connection closed ({code:?})")),
            Some(Frame::Json(v)) if v["op"] == "queue-empty" => continue,
            Some(Frame::Json(v)) if v["op"] == "message" => {
                let guid = v["envelope"]["guid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                ws.ack(&guid).await;
            }
            Some(Frame::Json(v)) => return Ok(v),
        }
    }
}

fn check_answer(expect: &Expect, got: &Value) -> Result<(), TestCaseError> {
    match expect {
        Expect::Error => {
            prop_assert!(
                got["op"] == "error" && got["message"].is_string(),
                "expected an error frame, got {got}"
            );
        }
        Expect::Response(id, status) => {
            prop_assert!(got["op"] == "response", "expected a response, got {got}");
            prop_assert_eq!(&got["id"], id, "response to another id: {}", got);
            let s = got["status"].as_u64().unwrap_or(0);
            prop_assert!((200..500).contains(&s), "status {} in {}", s, got);
            if let Some(want) = status {
                prop_assert_eq!(s, u64::from(*want), "{}", got);
            }
            if s >= 400 {
                let body = &got["body"];
                prop_assert!(
                    body["error"].is_string() && body["message"].is_string(),
                    "response body lacks error/message: {}",
                    got
                );
            }
        }
        Expect::Nothing | Expect::SomeErrors => unreachable!("checked by the caller"),
    }
    Ok(())
}

/// Sends an invalid `send` with a fresh id and reads up to its `400`. Everything before it must
/// be an error frame, and only where `errors_allowed`; returns how many there were. Also resets
/// the session's count of unusable frames.
async fn sync(ws: &mut Ws, id: i64, errors_allowed: bool) -> Result<usize, TestCaseError> {
    ws.send_text(&json!({"op": "send", "id": id}).to_string())
        .await;
    let mut errors = 0;
    loop {
        let got = next_answer(ws).await.map_err(TestCaseError::fail)?;
        if got["op"] == "response" && got["id"] == id {
            prop_assert_eq!(&got["status"], &json!(400), "{}", got);
            return Ok(errors);
        }
        prop_assert!(
            errors_allowed && got["op"] == "error" && got["message"].is_string(),
            "unexpected frame before the sync response: {}",
            got
        );
        errors += 1;
    }
}

async fn websocket_survives_hostile_frames(backend: Backend) {
    let f = fixture(backend).await;
    let ctx = Ctx::new(
        vec![f.alice.device.uuid.clone(), f.bob.device.uuid.clone()],
        vec![f.alice.device.registration_id, f.bob.device.registration_id],
    );
    let mut ws = f.alice.device.connect().await;
    ws.drain_queue().await;
    let handle = Handle::current();
    let total = cases(WS_CASES);
    let (f, mut ws, stats) = tokio::task::spawn_blocking(move || {
        let socket = RefCell::new(ws);
        let kinds = RefCell::new(BTreeMap::<&'static str, u32>::new());
        let statuses = RefCell::new(BTreeMap::<u64, u32>::new());
        let sync_id = Cell::new(-1_000_000_000i64);
        let next_sync = || {
            sync_id.set(sync_id.get() - 1);
            sync_id.get()
        };
        let strategy = vec(ws_out(&ctx), 1..5);
        let result = runner(total).run(&strategy, |outs| {
            let mut ws = socket.borrow_mut();
            handle.block_on(async {
                let outcome = async {
                    for out in &outs {
                        let expect = out.expect();
                        *kinds.borrow_mut().entry(expect.kind()).or_default() += 1;
                        send_out(&mut ws, out).await.map_err(TestCaseError::fail)?;
                        match expect {
                            Expect::Nothing => {}
                            Expect::SomeErrors => {
                                // Today one error frame per fragment: read them all here.
                                let errors = sync(&mut ws, next_sync(), true).await?;
                                prop_assert!(errors >= 1, "no error frame for {:?}", out);
                            }
                            _ => {
                                let got =
                                    next_answer(&mut ws).await.map_err(TestCaseError::fail)?;
                                check_answer(&expect, &got)?;
                                if let Some(status) = got["status"].as_u64() {
                                    *statuses.borrow_mut().entry(status).or_default() += 1;
                                }
                            }
                        }
                    }
                    // Nothing else may arrive.
                    sync(&mut ws, next_sync(), false).await.map(|_| ())
                }
                .await;
                if outcome.is_err() {
                    // Whatever is left unread must not spill into the cases proptest tries
                    // while shrinking: start them on a fresh connection.
                    *ws = f.alice.device.connect().await;
                    ws.drain_queue().await;
                }
                outcome
            })
        });
        if let Err(e) = result {
            panic!("hostile WebSocket input: {e}");
        }
        let stats = format!(
            "{total} cases, messages by expected answer {:?}, response statuses {:?}",
            kinds.borrow(),
            statuses.borrow()
        );
        (f, socket.into_inner(), stats)
    })
    .await
    .expect("property thread");
    eprintln!("{backend:?} WebSocket: {stats}");

    // The same socket still carries a valid send.
    let body = send_body(&[f.bob.device.target()], b"after the barrage", false);
    let (answer, _) = ws.send_and_wait(424_242, &f.bob.device.uuid, body).await;
    assert_eq!(answer["status"], 200, "{answer}");
    ws.close().await;
    assert_intact(&f, &Consumed::new()).await;
}

fn garbage(i: usize) -> Message {
    match i % 3 {
        0 => Message::Text(format!("garbage {i}")),
        1 => Message::Binary(vec![i as u8; i % 7]),
        _ => Message::Text(json!({"op": "send", "id": "not an integer", "n": i}).to_string()),
    }
}

/// `n` unusable frames, then their `n` error frames.
async fn barrage(ws: &mut Ws, n: usize) {
    for i in 0..n {
        ws.stream.send(garbage(i)).await.expect("ws send");
    }
    for i in 0..n {
        let v = ws.next_json().await;
        assert_eq!(v["op"], "error", "frame {i}: {v}");
    }
}

/// 100 unusable frames in a row are tolerated, a usable one resets the count, and the 101st in
/// a row gets its error frame and then a `1008` close. Only that socket is affected.
async fn unusable_frames_close_after_100_in_a_row(backend: Backend) {
    let f = fixture(backend).await;
    let (alice, bob) = (&f.alice.device, &f.bob.device);
    let mut ws = alice.connect().await;
    ws.drain_queue().await;
    barrage(&mut ws, MAX_BAD_FRAMES).await;
    // A usable frame (an ack needs no answer) resets the count.
    ws.ack(&uuid::Uuid::new_v4().to_string()).await;
    barrage(&mut ws, MAX_BAD_FRAMES).await;
    let body = send_body(&[bob.target()], b"still open", false);
    let (answer, _) = ws.send_and_wait(1, &bob.uuid, body).await;
    assert_eq!(answer["status"], 200, "{answer}");

    barrage(&mut ws, MAX_BAD_FRAMES + 1).await;
    assert_eq!(ws.closed().await, Some(1008));

    // The server and the device are fine: a new connection works.
    assert_healthy(&f.server).await;
    let mut ws = alice.connect().await;
    ws.drain_queue().await;
    let body = send_body(&[bob.target()], b"reconnected", false);
    let (answer, _) = ws.send_and_wait(2, &bob.uuid, body).await;
    assert_eq!(answer["status"], 200, "{answer}");
    ws.close().await;
    assert_intact(&f, &Consumed::new()).await;
}

/// A text frame that is not UTF-8 cannot be read at all: RFC 6455 §8.1 says to fail the
/// connection, and actix does (protocol error, close 1002). Fragmented, the same bytes get an
/// `error` frame (the session reassembles fragments itself). Either way only that socket is
/// affected and nothing stored changes.
async fn text_frame_that_is_not_utf8(backend: Backend) {
    let f = fixture(backend).await;
    let (alice, bob) = (&f.alice.device, &f.bob.device);
    let bad = b"{\"op\":\"send\",\"id\":1,\xff\xfe}".to_vec();

    let mut ws = alice.connect().await;
    ws.drain_queue().await;
    let frame = RawFrame::message(bad.clone(), OpCode::Data(Data::Text), true);
    ws.stream
        .send(Message::Frame(frame))
        .await
        .expect("ws send");
    match ws.next_within(Duration::from_secs(10)).await {
        Some(Frame::Closed(code)) => assert_ne!(code, Some(1000), "closed as if all was well"),
        other => panic!("expected the connection to be failed, got {other:?}"),
    }
    assert_healthy(&f.server).await;

    let mut ws = alice.connect().await;
    ws.drain_queue().await;
    let (first, rest) = bad.split_at(5);
    for (i, part) in [first, rest].into_iter().enumerate() {
        let data = if i == 0 { Data::Text } else { Data::Continue };
        let frame = RawFrame::message(part.to_vec(), OpCode::Data(data), i == 1);
        ws.stream
            .send(Message::Frame(frame))
            .await
            .expect("ws send");
    }
    let v = ws.next_json().await;
    assert_eq!(v["op"], "error", "{v}");
    let body = send_body(&[bob.target()], b"after", false);
    let (answer, _) = ws.send_and_wait(3, &bob.uuid, body).await;
    assert_eq!(answer["status"], 200, "{answer}");
    ws.close().await;
    assert_intact(&f, &Consumed::new()).await;
}

backends!(
    http_endpoints_survive_hostile_bodies,
    websocket_survives_hostile_frames,
    unusable_frames_close_after_100_in_a_row,
    text_frame_that_is_not_utf8,
);
