//! Crash trials: an answered send is never lost, whatever happens after.
//!
//! A sender streams messages to three devices that go online and offline at
//! random (acking some copies, dropping connections before acking others),
//! and the server is killed with SIGKILL at random moments and restarted on
//! the same database. At the end every device drains its mailbox, and every
//! message whose send was answered `200` must have reached its device at
//! least once.
//!
//! CI runs a few trials per backend. The documented long run:
//! `COURIER_CRASH_TRIALS=200 cargo test --release --test crash -- --nocapture`
//! (with `COURIER_TEST_POSTGRES_URL` set for PostgreSQL too).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::CourierProcess;
use common::trials::{drain_all, listen, Seen};
use common::*;
use rand::Rng;

/// Concurrent send streams per trial.
const SENDER_STREAMS: usize = 8;

fn trials() -> usize {
    std::env::var("COURIER_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

async fn answered_sends_survive_kill_9(backend: Backend) {
    let db = Database::fresh(backend);
    let env = [("COURIER_ACK_TIMEOUT_MS", "150")];
    let mut server = CourierProcess::start(&db.url(), &env);
    let base = server.url("");
    let sender = TestDevice::register_at(&base).await;
    let mut devices = Vec::new();
    for _ in 0..3 {
        devices.push(TestDevice::register_at(&base).await);
    }
    let seen: Seen = Arc::new(Mutex::new(BTreeMap::new()));
    let mut answered: Vec<(String, String)> = Vec::new(); // (device uuid, content)
    let mut sent = 0usize;
    let trials = trials();

    for trial in 0..trials {
        let base = server.url("");
        let mut tasks = Vec::new();
        // Devices: some online (acking, or dropping before acking), some offline.
        for d in &devices {
            let mode = rand::thread_rng().gen_range(0..3);
            if mode == 0 {
                continue; // offline this trial
            }
            let d = TestDevice {
                base: base.clone(),
                ..d.clone()
            };
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                listen(d, seen, mode == 1, None).await
            }));
        }
        // Eight concurrent streams from the sender, until the server dies.
        let answers = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(Mutex::new(0usize));
        let streams: Vec<_> = (0..SENDER_STREAMS)
            .map(|stream| {
                let sender = TestDevice {
                    base: base.clone(),
                    ..sender.clone()
                };
                let devices = devices.clone();
                let answers = answers.clone();
                let attempts = attempts.clone();
                tokio::spawn(async move {
                    let client = http();
                    for seq in 0.. {
                        let d = &devices[(seq + stream) % devices.len()];
                        let content = format!("trial {trial} stream {stream} seq {seq}");
                        *attempts.lock().unwrap() += 1;
                        let body = send_body(&[d.target()], content.as_bytes(), false);
                        let res = client
                            .put(format!("{}/v1/messages/{}", sender.base, d.uuid))
                            .basic_auth(sender.login(), Some(&sender.password))
                            .json(&body)
                            .send()
                            .await;
                        match res {
                            Ok(r) if r.status().is_success() => {
                                answers.lock().unwrap().push((d.uuid.clone(), content));
                            }
                            Ok(r) => panic!("unexpected answer {}", r.status()),
                            Err(_) => break, // the server is gone
                        }
                    }
                })
            })
            .collect();
        let life = rand::thread_rng().gen_range(100..600);
        tokio::time::sleep(Duration::from_millis(life)).await;
        server.child.kill().expect("SIGKILL");
        let _ = server.child.wait();
        for stream in streams {
            let _ = stream.await;
        }
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        sent += *attempts.lock().unwrap();
        answered.extend(answers.lock().unwrap().drain(..));
        server = CourierProcess::start(&db.url(), &env);
    }

    // Every device drains what is left.
    let base = server.url("");
    for d in &devices {
        let d = TestDevice {
            base: base.clone(),
            ..d.clone()
        };
        drain_all(&d, &seen).await;
    }
    let seen = seen.lock().unwrap();
    let lost: Vec<&(String, String)> = answered
        .iter()
        .filter(|(device, content)| !seen.get(device).is_some_and(|s| s.contains(content)))
        .collect();
    let delivered = answered.len() - lost.len();
    println!(
        "{backend:?}: trials {trials}, sent {sent}, answered {}, delivered {delivered}, lost {}",
        answered.len(),
        lost.len()
    );
    assert!(answered.len() > trials, "the trials sent almost nothing");
    assert!(lost.is_empty(), "lost answered messages: {lost:?}");
}

backends!(answered_sends_survive_kill_9);
