//! `bundles`: prekey distribution under concurrent fetching.
//!
//! M target devices each upload K one-time EC prekeys (in chunks of at most
//! 100, the SPEC's per-upload limit), with a real identity key and signed
//! prekey from the libsignal vectors. Then F fetcher accounts, each on its
//! own keep-alive HTTP client, make N `GET /v1/keys/{uuid}/1` in total,
//! round-robin over the targets, all concurrently. It measures bundles/s and
//! fetch latency, and checks the one property that makes X3DH safe: a
//! one-time prekey is handed out at most once, ever. A (device, keyId) seen
//! twice fails the run loudly; so does a device that handed out more or
//! fewer one-time keys than min(its fetches, K), or a key the device never
//! uploaded.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::StreamExt;
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{self, Device};
use crate::stats::{per_sec, round1, Latency, Progress, Report};

/// The repository's libsignal key vectors (`tests/data/libsignal-keys.json`
/// at the top of the checkout).
pub const DEFAULT_VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/data/libsignal-keys.json"
);

/// The SPEC's bound on one-time keys per upload.
const MAX_KEYS_PER_UPLOAD: usize = 100;

#[derive(clap::Args, Clone, Debug)]
pub struct BundlesArgs {
    /// Target devices (one account each).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// One-time EC prekeys uploaded per device.
    #[arg(long, default_value_t = 200)]
    pub keys: usize,
    /// Concurrent fetcher accounts (one HTTP client each).
    #[arg(long, default_value_t = 8)]
    pub fetchers: usize,
    /// Bundle fetches in total.
    #[arg(long, default_value_t = 10_000)]
    pub fetches: u64,
    /// libsignal key vectors (identity key + signed prekey per entry).
    #[arg(long, default_value = DEFAULT_VECTORS)]
    pub vectors: PathBuf,
}

/// `valid[i]` of the vectors file: what a device uploads besides its
/// generated one-time keys.
struct Identity {
    identity_key: String,
    signed_pre_key: Value,
    pq_last_resort: Option<Value>,
}

fn load_vectors(path: &PathBuf) -> anyhow::Result<Vec<Identity>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read {} (pass --vectors)", path.display()))?;
    let v: Value = serde_json::from_str(&text).context("vectors are not JSON")?;
    let valid = v["valid"]
        .as_array()
        .context("vectors have no `valid` array")?;
    let out: Vec<Identity> = valid
        .iter()
        .filter_map(|e| {
            Some(Identity {
                identity_key: e["identityKey"].as_str()?.to_owned(),
                signed_pre_key: e.get("signedPreKey")?.clone(),
                pq_last_resort: e.get("pqLastResortPreKey").cloned(),
            })
        })
        .collect();
    if out.is_empty() {
        bail!("no usable entry in `valid` of {}", path.display());
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    identity_key: String,
    devices: Vec<BundleDevice>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BundleDevice {
    device_id: u32,
    #[serde(default)]
    pre_key: Option<PreKey>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreKey {
    key_id: u32,
    public_key: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyCount {
    count: i64,
}

/// One fetch's outcome.
enum Fetched {
    /// A bundle; the one-time key it carried, if any.
    Bundle {
        target: usize,
        pre_key: Option<(u32, String)>,
        identity_key: String,
        device_ids: Vec<u32>,
    },
    Failed(String),
}

pub async fn run(base: &str, args: &BundlesArgs, quiet: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("bundles");
    let (m, k, f, n) = (args.devices, args.keys, args.fetchers, args.fetches);
    if m == 0 || f == 0 || n == 0 || k > 1_000_000 || m > 1_000_000 || n > 100_000_000 {
        bail!("--devices, --fetchers, --fetches must be positive (and sane)");
    }
    let vectors = load_vectors(&args.vectors)?;
    let devices = {
        let progress = Progress::new("register", &["accounts"], 0);
        let _line = progress.report_every_second(quiet);
        client::register_many(base, m + f, 32, Some(progress.counter(0))).await?
    };
    let (targets, fetchers) = devices.split_at(m);

    // ---- upload ----
    let progress = Progress::new("upload", &["keys"], 0);
    let line = progress.report_every_second(quiet);
    let upload_start = Instant::now();
    let http = client::http_client();
    let uploaded: Vec<anyhow::Result<Vec<String>>> =
        futures_util::stream::iter(targets.iter().enumerate())
            .map(|(i, d)| {
                let (http, vectors, progress) = (&http, &vectors, &progress);
                async move {
                    let keys = generate_keys(k);
                    upload(http, base, d, &vectors[i % vectors.len()], &keys, progress).await?;
                    Ok(keys)
                }
            })
            .buffered(8)
            .collect()
            .await;
    let upload_time = upload_start.elapsed();
    drop(line);
    let mut keys_of = Vec::with_capacity(m);
    for (i, r) in uploaded.into_iter().enumerate() {
        keys_of.push(r.with_context(|| format!("upload for target {i}"))?);
    }
    let upload_rate = per_sec((m * k) as u64, upload_time);
    report.row(
        "sizes",
        format!("{m} devices × {k} one-time keys, {f} fetchers, {n} fetches"),
    );
    report.row(
        "upload",
        format!(
            "{} keys in {:.2} s ({upload_rate:.0} keys/s, ≤{MAX_KEYS_PER_UPLOAD} per PUT)",
            m * k,
            upload_time.as_secs_f64()
        ),
    );
    let before = key_counts(&http, base, targets).await;
    let wrong_before = before.iter().filter(|c| **c != Some(k as i64)).count();
    if wrong_before > 0 {
        report.fail(format!(
            "{wrong_before} devices do not report {k} keys after upload (GET /v1/keys/count; first: {:?})",
            before.iter().find(|c| **c != Some(k as i64))
        ));
    }

    // ---- fetch ----
    let progress = Progress::new("fetch", &["bundles", "errors"], 0);
    let line = progress.report_every_second(quiet);
    let targets_arc: Arc<Vec<Device>> = Arc::new(targets.to_vec());
    let fetch_start = Instant::now();
    let tasks: Vec<_> = fetchers
        .iter()
        .enumerate()
        .map(|(i, fetcher)| {
            let (fetcher, targets, progress, base) = (
                fetcher.clone(),
                targets_arc.clone(),
                progress.clone(),
                base.to_owned(),
            );
            tokio::spawn(async move {
                let http = client::http_client();
                let mut latency = Latency::new();
                let mut out = Vec::new();
                let mut j = i as u64;
                while j < n {
                    let target = (j % targets.len() as u64) as usize;
                    let t0 = Instant::now();
                    let r = fetch(&http, &base, &fetcher, &targets[target], target).await;
                    latency.record(t0.elapsed());
                    progress.add(
                        if matches!(r, Fetched::Bundle { .. }) {
                            0
                        } else {
                            1
                        },
                        1,
                    );
                    out.push(r);
                    j += f as u64;
                }
                (out, latency)
            })
        })
        .collect();
    let mut results = Vec::new();
    let mut latency = Latency::new();
    for t in tasks {
        match t.await {
            Ok((out, l)) => {
                results.extend(out);
                latency.merge(&l);
            }
            Err(e) => results.push(Fetched::Failed(format!("fetcher task: {e}"))),
        }
    }
    let fetch_time = fetch_start.elapsed();
    drop(line);

    // ---- verify ----
    let mut seen: HashSet<(usize, u32)> = HashSet::new();
    let mut fetched_ok = vec![0u64; m];
    let mut with_key = vec![0u64; m];
    let (mut duplicates, mut unknown_keys, mut wrong_key, mut wrong_identity, mut wrong_device) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut failures = BTreeMap::<String, u64>::new();
    let mut first_duplicates = Vec::new();
    for r in &results {
        match r {
            Fetched::Failed(e) => *failures.entry(e.clone()).or_default() += 1,
            Fetched::Bundle {
                target,
                pre_key,
                identity_key,
                device_ids,
            } => {
                fetched_ok[*target] += 1;
                if *identity_key != vectors[*target % vectors.len()].identity_key {
                    wrong_identity += 1;
                }
                if device_ids.as_slice() != [1] {
                    wrong_device += 1;
                }
                if let Some((key_id, public_key)) = pre_key {
                    with_key[*target] += 1;
                    if !seen.insert((*target, *key_id)) {
                        duplicates += 1;
                        if first_duplicates.len() < 5 {
                            first_duplicates
                                .push(format!("device {} keyId {key_id}", targets[*target].uuid));
                        }
                    }
                    match keys_of[*target].get((*key_id as usize).wrapping_sub(1)) {
                        Some(k) if k == public_key => {}
                        Some(_) => wrong_key += 1,
                        None => unknown_keys += 1,
                    }
                }
            }
        }
    }
    let ok_fetches: u64 = fetched_ok.iter().sum();
    let bundle_rate = per_sec(ok_fetches, fetch_time);
    let wrong_counts: Vec<usize> = (0..m)
        .filter(|&d| with_key[d] != fetched_ok[d].min(k as u64))
        .collect();
    let after = key_counts(&http, base, targets).await;
    let wrong_after = (0..m)
        .filter(|&d| after[d] != Some(k as i64 - with_key[d] as i64))
        .count();

    report.row(
        "fetch",
        format!(
            "{ok_fetches} bundles in {:.2} s, {} failed",
            fetch_time.as_secs_f64(),
            results.len() as u64 - ok_fetches
        ),
    );
    report.row("bundles", format!("{bundle_rate:.0} bundles/s"));
    report.row("fetch latency", latency.summary());
    report.row(
        "one-time keys",
        format!(
            "{} handed out, duplicates {duplicates}, unknown {unknown_keys}, wrong bytes {wrong_key}",
            with_key.iter().sum::<u64>()
        ),
    );
    report.row(
        "per-device check",
        format!(
            "{} of {m} devices handed out min(fetches, {k}) keys; {} of {m} report the right count left",
            m - wrong_counts.len(),
            m - wrong_after
        ),
    );
    if duplicates > 0 {
        eprintln!(
            "\n!!!!!!!! ONE-TIME PREKEY HANDED OUT TWICE: {duplicates} duplicate (device, keyId) pairs, e.g. {first_duplicates:?} !!!!!!!!\n"
        );
        report.fail(format!(
            "ONE-TIME PREKEYS HANDED OUT TWICE: {duplicates} (first: {})",
            first_duplicates.join(", ")
        ));
    }
    if unknown_keys + wrong_key > 0 {
        report.fail(format!(
            "{unknown_keys} bundles carried a keyId never uploaded, {wrong_key} carried other bytes than uploaded"
        ));
    }
    if wrong_identity + wrong_device > 0 {
        report.fail(format!(
            "{wrong_identity} bundles with the wrong identity key, {wrong_device} with the wrong device list"
        ));
    }
    if let Some(&d) = wrong_counts.first() {
        report.fail(format!(
            "{} devices handed out a number of one-time keys other than min(fetches, {k}); e.g. device {d}: {} of {} fetches carried one",
            wrong_counts.len(),
            with_key[d],
            fetched_ok[d]
        ));
    }
    if wrong_after > 0 {
        report.fail(format!(
            "{wrong_after} devices report a key count other than uploaded minus handed out"
        ));
    }
    for (e, count) in failures.iter().take(3) {
        report.fail(format!("{count} fetches failed: {e}"));
    }

    report.fig("devices", m);
    report.fig("keys", k);
    report.fig("fetchers", f);
    report.fig("fetches", n);
    report.fig("upload_s", upload_time.as_secs_f64());
    report.fig("upload_keys_per_s", round1(upload_rate));
    report.fig("ok_fetches", ok_fetches);
    report.fig("fetch_s", fetch_time.as_secs_f64());
    report.fig("bundles_per_s", round1(bundle_rate));
    report.fig("fetch_latency", latency.json());
    report.fig("prekeys_handed_out", with_key.iter().sum::<u64>());
    report.fig("duplicate_prekeys", duplicates);
    report.fig("unknown_prekeys", unknown_keys);
    report.fig("wrong_prekey_bytes", wrong_key);
    report.fig("devices_with_wrong_prekey_count", wrong_counts.len());
    report.fig("devices_with_wrong_count_left", wrong_after);
    report.fig("failed_fetches", results.len() as u64 - ok_fetches);
    Ok(report)
}

/// K one-time EC public keys as libsignal serialises them (0x05 ‖ 32
/// bytes), base64; keyId of entry i is i + 1.
fn generate_keys(k: usize) -> Vec<String> {
    let mut rng = rand::thread_rng();
    (0..k)
        .map(|_| {
            let mut key = [0u8; 33];
            key[0] = 0x05;
            rng.fill_bytes(&mut key[1..]);
            B64.encode(key)
        })
        .collect()
}

/// `PUT /v1/keys` in chunks: the first carries the identity and signed
/// (and PQ last-resort) keys, every one carries the identity key.
async fn upload(
    http: &reqwest::Client,
    base: &str,
    device: &Device,
    identity: &Identity,
    keys: &[String],
    progress: &Progress,
) -> anyhow::Result<()> {
    let chunks: Vec<&[String]> = if keys.is_empty() {
        vec![&[]]
    } else {
        keys.chunks(MAX_KEYS_PER_UPLOAD).collect()
    };
    let mut next_id = 1u32;
    for (c, chunk) in chunks.into_iter().enumerate() {
        let pre_keys: Vec<Value> = chunk
            .iter()
            .map(|pk| {
                let v = json!({"keyId": next_id, "publicKey": pk});
                next_id += 1;
                v
            })
            .collect();
        let mut body = json!({"identityKey": identity.identity_key, "preKeys": pre_keys});
        if c == 0 {
            body["signedPreKey"] = identity.signed_pre_key.clone();
            if let Some(pq) = &identity.pq_last_resort {
                body["pqLastResortPreKey"] = pq.clone();
            }
        }
        let res = http
            .put(format!("{base}/v1/keys"))
            .basic_auth(device.login(), Some(&device.password))
            .json(&body)
            .send()
            .await
            .context("PUT /v1/keys")?;
        let status = res.status();
        if !status.is_success() {
            let text = res.text().await.unwrap_or_default();
            bail!("PUT /v1/keys answered {status}: {text}");
        }
        progress.add(0, chunk.len() as u64);
    }
    Ok(())
}

/// `GET /v1/keys/count` of every device (`None` where it failed).
async fn key_counts(http: &reqwest::Client, base: &str, devices: &[Device]) -> Vec<Option<i64>> {
    futures_util::stream::iter(devices)
        .map(|d| async move {
            let res = http
                .get(format!("{base}/v1/keys/count"))
                .basic_auth(d.login(), Some(&d.password))
                .send()
                .await
                .ok()?;
            if !res.status().is_success() {
                return None;
            }
            res.json::<KeyCount>().await.ok().map(|c| c.count)
        })
        .buffered(16)
        .collect()
        .await
}

async fn fetch(
    http: &reqwest::Client,
    base: &str,
    fetcher: &Device,
    target: &Device,
    index: usize,
) -> Fetched {
    let res = match http
        .get(format!("{base}/v1/keys/{}/1", target.uuid))
        .basic_auth(fetcher.login(), Some(&fetcher.password))
        .timeout(Duration::from_secs(30))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Fetched::Failed(format!("transport: {}", without_url(&e))),
    };
    let status = res.status();
    if !status.is_success() {
        return Fetched::Failed(format!("status {status}"));
    }
    match res.json::<Bundle>().await {
        Ok(b) => Fetched::Bundle {
            target: index,
            pre_key: b
                .devices
                .iter()
                .find_map(|d| d.pre_key.as_ref())
                .map(|p| (p.key_id, p.public_key.clone())),
            identity_key: b.identity_key,
            device_ids: b.devices.iter().map(|d| d.device_id).collect(),
        },
        Err(e) => Fetched::Failed(format!("body: {}", without_url(&e))),
    }
}

/// A reqwest error without its URL, so that equal failures group together.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "URL");
    }
    s
}
