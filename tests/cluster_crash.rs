//! Crash trials for a cluster: the delivery guarantee survives the death of
//! a node and the loss of Redis.
//!
//! - `kill_9_of_the_holding_node`: three real `courier` processes on one
//!   PostgreSQL database and one Redis. Devices are connected to node C
//!   (some acking, some never acking, some offline), a sender streams HTTP
//!   sends to them through node A, and node C is killed with SIGKILL at a
//!   random moment while sends to its devices are in flight. Every send must
//!   be answered (bounded), and at the end every device, draining its mailbox
//!   through node B, must have seen every message whose send was answered
//!   `200`.
//! - `redis_stopped_mid_load`: two nodes on a Redis of the test's own; Redis
//!   is killed while a sender streams sends through node 1 to a device on
//!   node 2. Sends keep being answered `200`, `/readyz` says `redis
//!   unreachable`, the nodes recover by themselves when Redis returns (the
//!   device's existing connection gets live deliveries again), and nothing
//!   answered is lost.
//!
//! They run when both `COURIER_TEST_POSTGRES_URL` and
//! `COURIER_TEST_REDIS_URL` are set. More trials:
//! `COURIER_CLUSTER_CRASH_TRIALS=20 cargo test --test cluster_crash -- --nocapture`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{
    cluster_available, node_config, redis_url, unique_cluster_name, PrivateRedis,
};
use common::process::CourierProcess;
use common::trials::{drain_all, listen, Seen};
use common::*;
use rand::Rng;
use serde_json::{json, Value};

/// Concurrent send streams through node A per trial.
const SENDER_STREAMS: usize = 6;
/// No send may stay unanswered longer than this (the fallback spill of a
/// copy forwarded to a dead node comes after 2 × ack timeout + 2 s).
const SEND_BOUND: Duration = Duration::from_secs(15);
const ACK_TIMEOUT_MS: &str = "150";

fn trials() -> usize {
    std::env::var("COURIER_CLUSTER_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// What became of the sends of a run.
#[derive(Default)]
struct Outcomes {
    /// `(device uuid, content)` of every send answered `200`.
    answered: Vec<(String, String)>,
    delivered: usize,
    queued: usize,
    /// Sends answered otherwise, failed, or not answered in time.
    failures: Vec<String>,
    attempts: usize,
    slowest: Duration,
}

impl Outcomes {
    fn merge(&mut self, other: Outcomes) {
        self.answered.extend(other.answered);
        self.delivered += other.delivered;
        self.queued += other.queued;
        self.failures.extend(other.failures);
        self.attempts += other.attempts;
        self.slowest = self.slowest.max(other.slowest);
    }
}

/// One `PUT /v1/messages/{dest}` as `sender` through `base`, bounded by
/// [`SEND_BOUND`]; records its outcome. Returns the delivery status of an
/// answered send.
async fn send_one(
    client: &reqwest::Client,
    base: &str,
    sender: &TestDevice,
    dest: &TestDevice,
    content: String,
    out: &Mutex<Outcomes>,
) -> Option<String> {
    let body = send_body(&[dest.target()], content.as_bytes(), false);
    let started = Instant::now();
    let request = client
        .put(format!("{base}/v1/messages/{}", dest.uuid))
        .basic_auth(sender.login(), Some(&sender.password))
        .json(&body)
        .send();
    let answer = tokio::time::timeout(SEND_BOUND, async {
        let res = request.await?;
        let status = res.status();
        let text = res.text().await?;
        Ok::<_, reqwest::Error>((status, text))
    })
    .await;
    let took = started.elapsed();
    let mut out = out.lock().unwrap();
    out.attempts += 1;
    out.slowest = out.slowest.max(took);
    match answer {
        Err(_) => {
            out.failures
                .push(format!("{content}: no answer within {SEND_BOUND:?}"));
            None
        }
        Ok(Err(e)) => {
            out.failures
                .push(format!("{content}: request failed after {took:?}: {e}"));
            None
        }
        Ok(Ok((status, text))) if status.is_success() => {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let what = v["results"][0]["status"].as_str().unwrap_or("").to_owned();
            match what.as_str() {
                "delivered" => out.delivered += 1,
                "queued" => out.queued += 1,
                _ => out
                    .failures
                    .push(format!("{content}: 200 with unexpected body {text}")),
            }
            out.answered.push((dest.uuid.clone(), content));
            Some(what)
        }
        Ok(Ok((status, text))) => {
            out.failures
                .push(format!("{content}: answered {status} {text}"));
            None
        }
    }
}

fn bounded_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(SEND_BOUND + Duration::from_secs(5))
        .build()
        .expect("client")
}

// ---------------------------------------------------------------------------
// kill -9 of the node holding the devices
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_holding_node() {
    if !cluster_available() {
        return;
    }
    let db = Database::fresh(Backend::Postgres);
    let redis = redis_url().expect("redis url");
    let name = unique_cluster_name();
    let env = [
        ("COURIER_REDIS_URL", redis.as_str()),
        ("COURIER_CLUSTER_NAME", name.as_str()),
        ("COURIER_ACK_TIMEOUT_MS", ACK_TIMEOUT_MS),
    ];
    let start = {
        let url = db.url();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            CourierProcess::start(&url, &env)
        }
    };
    let node_a = start();
    let node_b = start();
    let mut node_c = Some(start());
    let (base_a, base_b) = (node_a.url(""), node_b.url(""));

    let sender = TestDevice::register_at(&base_a).await;
    let mut devices = Vec::new();
    for _ in 0..3 {
        devices.push(TestDevice::register_at(&base_a).await);
    }
    let seen: Seen = Arc::new(Mutex::new(BTreeMap::new()));
    let mut total = Outcomes::default();
    let trials = trials();
    let mut restarts_under_load = 0;

    for trial in 0..trials {
        let c = match node_c.take() {
            Some(c) => c,
            None => tokio::task::spawn_blocking(start.clone()).await.unwrap(),
        };
        let base_c = c.url("");
        // Devices on C: acking, never acking (the connection drops with the
        // node), or offline this trial. At least one is online.
        let mut modes: Vec<u32> = (0..devices.len())
            .map(|_| rand::thread_rng().gen_range(0..3))
            .collect();
        if modes.iter().all(|m| *m == 0) {
            modes[trial % devices.len()] = 1;
        }
        let mut listeners = Vec::new();
        let mut ready = Vec::new();
        for (d, &mode) in devices.iter().zip(&modes) {
            if mode == 0 {
                continue;
            }
            let d = TestDevice {
                base: base_c.clone(),
                ..d.clone()
            };
            let seen = seen.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            listeners.push(tokio::spawn(listen(d, seen, mode == 1, Some(tx))));
            ready.push(rx);
        }
        for rx in ready {
            tokio::time::timeout(Duration::from_secs(20), rx)
                .await
                .expect("a device connected to node C within 20 s")
                .expect("the listener connected to node C");
        }

        // Concurrent streams through A until told to stop.
        let stop = Arc::new(AtomicBool::new(false));
        let out = Arc::new(Mutex::new(Outcomes::default()));
        let streams: Vec<_> = (0..SENDER_STREAMS)
            .map(|stream| {
                let (sender, devices, base_a) = (sender.clone(), devices.clone(), base_a.clone());
                let (stop, out) = (stop.clone(), out.clone());
                tokio::spawn(async move {
                    let client = bounded_client();
                    let mut seq = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let d = &devices[(seq + stream) % devices.len()];
                        let content = format!("trial {trial} stream {stream} seq {seq}");
                        send_one(&client, &base_a, &sender, d, content, &out).await;
                        seq += 1;
                    }
                })
            })
            .collect();

        let life = rand::thread_rng().gen_range(100..600);
        tokio::time::sleep(Duration::from_millis(life)).await;
        let mut c = c;
        let done_at_kill = out.lock().unwrap().attempts;
        c.child.kill().expect("SIGKILL node C");
        let _ = c.child.wait();
        drop(c);
        // Sometimes a new C starts while the sends go on; otherwise the next
        // trial starts it (and after the last one, C stays dead).
        let restart_now = trial + 1 < trials && rand::thread_rng().gen_bool(0.5);
        let restarted = if restart_now {
            restarts_under_load += 1;
            Some(tokio::task::spawn_blocking(start.clone()))
        } else {
            None
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        stop.store(true, Ordering::Relaxed);
        for s in streams {
            // Each send is bounded by SEND_BOUND: a stream ends soon after.
            tokio::time::timeout(SEND_BOUND + Duration::from_secs(10), s)
                .await
                .expect("a send stream ended (its sends bounded)")
                .expect("send stream task");
        }
        for l in listeners {
            l.abort();
            let _ = l.await;
        }
        if let Some(r) = restarted {
            node_c = Some(r.await.expect("restart C"));
        }
        let out = std::mem::take(&mut *out.lock().unwrap());
        println!(
            "trial {trial}: modes {modes:?}, killed after {life} ms ({done_at_kill} sends \
             done by then), sends {}, answered {} (delivered {}, queued {}), failures {}, \
             slowest answer {:?}",
            out.attempts,
            out.answered.len(),
            out.delivered,
            out.queued,
            out.failures.len(),
            out.slowest
        );
        total.merge(out);
    }
    drop(node_c);

    // Every device drains what is left through B (C is dead or new).
    for d in &devices {
        let d = TestDevice {
            base: base_b.clone(),
            ..d.clone()
        };
        drain_all(&d, &seen).await;
    }
    let seen = seen.lock().unwrap();
    let lost: Vec<&(String, String)> = total
        .answered
        .iter()
        .filter(|(device, content)| !seen.get(device).is_some_and(|s| s.contains(content)))
        .collect();
    println!(
        "cluster kill -9: trials {trials} ({restarts_under_load} restarts of C under load), \
         sent {}, answered {} (delivered {}, queued {}), seen {}, lost {}, failures {}, \
         slowest answer {:?}",
        total.attempts,
        total.answered.len(),
        total.delivered,
        total.queued,
        total.answered.len() - lost.len(),
        lost.len(),
        total.failures.len(),
        total.slowest
    );
    assert!(
        total.failures.is_empty(),
        "sends through node A not answered 200 ({} of {}), e.g. {:?}\nnode A log tail:\n{}",
        total.failures.len(),
        total.attempts,
        &total.failures[..total.failures.len().min(10)],
        tail(&node_a.log_text(), 40)
    );
    assert!(
        total.answered.len() > trials * 10,
        "the trials sent almost nothing"
    );
    assert!(
        lost.is_empty(),
        "lost {} answered messages: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
}

// ---------------------------------------------------------------------------
// Redis stopped mid-load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_mid_load() {
    if !cluster_available() {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let db = Database::fresh(Backend::Postgres);
    let name = unique_cluster_name();
    let tweak = |c: &mut courier::Config| c.ack_timeout_ms = 300;
    let node1 = TestServer::launch_node(node_config(&db, &redis.url(), &name, &tweak)).await;
    let node2 = TestServer::launch_node(node_config(&db, &redis.url(), &name, &tweak)).await;
    let (base1, base2) = (node1.url(""), node2.url(""));

    let sender = TestDevice::register_at(&base1).await;
    let receiver = TestDevice::register_at(&base1).await;
    let seen: Seen = Arc::new(Mutex::new(BTreeMap::new()));
    let on_node2 = TestDevice {
        base: base2.clone(),
        ..receiver.clone()
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let listener = tokio::spawn(listen(on_node2, seen.clone(), true, Some(tx)));
    tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .expect("the receiver connected to node 2 within 20 s")
        .expect("the receiver connected to node 2");

    // Two streams of sends through node 1, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Mutex::new(Outcomes::default()));
    let phase = Arc::new(Mutex::new("before"));
    let by_phase: Arc<Mutex<BTreeMap<&'static str, BTreeMap<String, usize>>>> =
        Arc::new(Mutex::new(BTreeMap::new()));
    let streams: Vec<_> = (0..2)
        .map(|stream| {
            let (sender, receiver, base1) = (sender.clone(), receiver.clone(), base1.clone());
            let (stop, out, phase, by_phase) =
                (stop.clone(), out.clone(), phase.clone(), by_phase.clone());
            tokio::spawn(async move {
                let client = bounded_client();
                let mut seq = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let p = *phase.lock().unwrap();
                    let content = format!("load {p} stream {stream} seq {seq}");
                    let what = send_one(&client, &base1, &sender, &receiver, content, &out).await;
                    *by_phase
                        .lock()
                        .unwrap()
                        .entry(p)
                        .or_default()
                        .entry(what.unwrap_or_else(|| "failed".into()))
                        .or_default() += 1;
                    seq += 1;
                    // A steady load, not a flood.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    *phase.lock().unwrap() = "outage";
    redis.stop();
    let stopped = Instant::now();

    // Within a few seconds, /readyz of node 1 (and 2) says why.
    for (n, base) in [(1, &base1), (2, &base2)] {
        let (status, body) = wait_readyz(base, 503, Duration::from_secs(8)).await;
        assert_eq!(
            status, 503,
            "node {n}: /readyz 8 s after Redis stopped: {status} {body}"
        );
        assert_eq!(
            body,
            json!({"error": "unavailable", "message": "redis unreachable"}),
            "node {n}: /readyz body while Redis is down"
        );
        println!(
            "node {n}: /readyz 503 {:?} after Redis stopped",
            stopped.elapsed()
        );
    }
    // The load goes on without Redis for a while (longer than a forward
    // waits for its confirmation, so that sends start and end in the outage).
    tokio::time::sleep(Duration::from_millis(6_000)).await;
    let answered_in_outage = by_phase
        .lock()
        .unwrap()
        .get("outage")
        .map(|m| m.values().sum::<usize>())
        .unwrap_or(0);

    *phase.lock().unwrap() = "after";
    redis.restart();
    let restarted = Instant::now();
    for (n, base) in [(1, &base1), (2, &base2)] {
        let (status, body) = wait_readyz(base, 200, Duration::from_secs(10)).await;
        assert_eq!(
            status, 200,
            "node {n}: /readyz 10 s after Redis came back: {status} {body}"
        );
        println!(
            "node {n}: /readyz 200 {:?} after Redis came back",
            restarted.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    for s in streams {
        tokio::time::timeout(SEND_BOUND + Duration::from_secs(10), s)
            .await
            .expect("a send stream ended (its sends bounded)")
            .expect("send stream task");
    }

    // The receiver's connection (never closed) gets live deliveries again:
    // node 2 re-announced it when the bus came back.
    let probe_client = bounded_client();
    let probes = Mutex::new(Outcomes::default());
    let mut probe_statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut live_again = None;
    let mut n = 0;
    while Instant::now() < deadline {
        let content = format!("probe {n}");
        n += 1;
        let what = send_one(&probe_client, &base1, &sender, &receiver, content, &probes).await;
        probe_statuses.push(what.clone().unwrap_or_else(|| "failed".into()));
        if what.as_deref() == Some("delivered") {
            live_again = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if live_again.is_none() {
        // What the cluster looks like, for the report.
        println!("Redis keys after recovery: {:?}", redis_keys(&redis.url()));
        for (n, base) in [(1, &base1), (2, &base2)] {
            println!("node {n} metrics:\n{}", cluster_metrics(base).await);
        }
    }
    let listener_alive = !listener.is_finished();
    listener.abort();
    let _ = listener.await;

    let mut total = std::mem::take(&mut *out.lock().unwrap());
    total.merge(std::mem::take(&mut *probes.lock().unwrap()));

    // Drain what was stored (copies spilled while the device stayed
    // connected come on its next connection).
    drain_all(&receiver, &seen).await;
    let seen = seen.lock().unwrap();
    let lost: Vec<&(String, String)> = total
        .answered
        .iter()
        .filter(|(device, content)| !seen.get(device).is_some_and(|s| s.contains(content)))
        .collect();
    println!(
        "redis outage: statuses by phase {:?}; sent {}, answered {} (delivered {}, queued {}), \
         seen {}, lost {}, failures {}, slowest answer {:?}; probes after recovery {:?} \
         (live again {:?} after Redis came back); receiver's connection alive: {listener_alive}",
        by_phase.lock().unwrap(),
        total.attempts,
        total.answered.len(),
        total.delivered,
        total.queued,
        total.answered.len() - lost.len(),
        lost.len(),
        total.failures.len(),
        total.slowest,
        probe_statuses,
        live_again,
    );
    let before = by_phase
        .lock()
        .unwrap()
        .get("before")
        .cloned()
        .unwrap_or_default();
    assert!(
        before.get("delivered").copied().unwrap_or(0) > 0,
        "no send was delivered live across nodes before the outage: {before:?}"
    );
    assert!(
        answered_in_outage > 0,
        "no send was answered during the Redis outage"
    );
    assert!(
        total.failures.is_empty(),
        "sends not answered 200 ({} of {}), e.g. {:?}",
        total.failures.len(),
        total.attempts,
        &total.failures[..total.failures.len().min(10)]
    );
    assert!(
        lost.is_empty(),
        "lost {} answered messages: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert!(
        listener_alive,
        "the receiver's connection to node 2 ended during the outage or the recovery"
    );
    assert!(
        live_again.is_some(),
        "after Redis came back, a send through node 1 to the device connected on node 2 was \
         never delivered live within 10 s: {probe_statuses:?}"
    );
    drop(node1);
    drop(node2);
    drop(db);
}

/// Every key in the Redis at `url` (`KEYS *`: a test's own Redis).
fn redis_keys(url: &str) -> Result<Vec<String>, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = client.get_connection().map_err(|e| e.to_string())?;
    redis::cmd("KEYS")
        .arg("*")
        .query(&mut conn)
        .map_err(|e| e.to_string())
}

/// The cluster lines of a node's `/metrics`.
async fn cluster_metrics(base: &str) -> String {
    match reqwest::get(format!("{base}/metrics")).await {
        Ok(r) => r
            .text()
            .await
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("cluster") && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("no metrics: {e}"),
    }
}

/// Polls `/readyz` until it answers `want` or `within` passes; the last answer.
async fn wait_readyz(base: &str, want: u16, within: Duration) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let deadline = Instant::now() + within;
    let mut last = (0, Value::Null);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            last = (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            );
            if status == want {
                return last;
            }
        }
        if Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The node holding a device freezes (SIGSTOP) while a copy is forwarded to
/// it: no confirmation comes in time, so the accepting node stores the copy
/// itself and answers `queued`. When the holder thaws it pushes the copy it
/// was forwarded, and learns that the copy was stored too: the device gets
/// it exactly once, on its open connection, and its ack leaves the mailbox
/// empty (no duplicate waits for its next connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_confirmation_stores_the_copy_once_and_pushes_it_once() {
    if !cluster_available() {
        return;
    }
    let db = Database::fresh(Backend::Postgres);
    let redis = redis_url().expect("redis url");
    let name = unique_cluster_name();
    let env = [
        ("COURIER_REDIS_URL", redis.as_str()),
        ("COURIER_CLUSTER_NAME", name.as_str()),
        ("COURIER_ACK_TIMEOUT_MS", "200"),
    ];
    let origin = CourierProcess::start(&db.url(), &env);
    let holder = CourierProcess::start(&db.url(), &env);
    let sender = TestDevice::register_at(&origin.url("")).await;
    let receiver = TestDevice::register_at(&origin.url("")).await;
    let mut rx = connect_empty(&TestDevice {
        base: holder.url(""),
        ..receiver.clone()
    })
    .await;

    holder.signal("STOP");
    let started = Instant::now();
    let (status, body) = sender
        .send(&receiver.uuid, &[receiver.target()], b"late")
        .await;
    holder.signal("CONT");
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["status"], "queued", "{body}");
    // Answered by the fallback: 2 × ack timeout + 2 s.
    assert!(started.elapsed() >= Duration::from_millis(2_000));

    let v = rx.next_json().await;
    assert_eq!(v["op"], "message", "{v}");
    assert_eq!(content_of(&v["envelope"]), b"late");
    let guid = v["envelope"]["guid"].as_str().unwrap().to_owned();
    rx.ack(&guid).await;
    // Exactly once: nothing more comes (the rescan finds the stored copy
    // held or acked, and does not push it again).
    assert_silent(&mut rx, Duration::from_millis(1_500)).await;
    mailbox_empties(&TestDevice {
        base: origin.url(""),
        ..receiver.clone()
    })
    .await;
    let metrics = cluster_metrics(&origin.url("")).await;
    assert!(
        metrics.contains("courier_cluster_fallback_spills_total 1"),
        "{metrics}"
    );
}
