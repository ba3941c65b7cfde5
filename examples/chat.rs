//! A minimal terminal chat over courier, to see two devices talk.
//!
//! ```sh
//! cargo run --example chat -- register            # prints LOGIN and PASSWORD; run twice (alice, bob)
//! cargo run --example chat -- chat --login ALICE_UUID --password ALICE_PW --to BOB_UUID
//! cargo run --example chat -- chat --login BOB_UUID --password BOB_PW --to ALICE_UUID
//! ```
//! Lines typed are sent to every device of the peer; incoming messages are
//! printed and acknowledged. NOTE: a real client encrypts each copy with
//! libsignal; this example sends the text merely base64-encoded, so the
//! broker's behaviour can be watched without a Signal stack.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// The repository's libsignal key vectors, built into the example so it runs
/// from any working directory.
const VECTORS: &str = include_str!("../tests/data/libsignal-keys.json");

#[derive(Parser)]
struct Cli {
    /// courier's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register an account and upload prekeys (a libsignal test vector).
    Register,
    /// Chat with another account.
    Chat {
        #[arg(long)]
        login: String,
        #[arg(long)]
        password: String,
        #[arg(long)]
        to: String,
    },
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let http = reqwest::Client::new();
    match cli.command {
        Cmd::Register => {
            let password = format!("chat-example-{:x}", now_ms());
            let reg: Value = http
                .post(format!("{}/v1/accounts", cli.server))
                .json(&json!({"password": password, "registrationId": 1 + now_ms() % 16000}))
                .send()
                .await?
                .json()
                .await?;
            let login = reg["uuid"]
                .as_str()
                .ok_or("registration failed")?
                .to_owned();
            let vectors: Value = serde_json::from_str(VECTORS)?;
            let keys = &vectors["valid"][(now_ms() % 8) as usize];
            http.put(format!("{}/v1/keys", cli.server))
                .basic_auth(&login, Some(&password))
                .json(keys)
                .send()
                .await?
                .error_for_status()?;
            println!("LOGIN={login}\nPASSWORD={password}");
        }
        Cmd::Chat {
            login,
            password,
            to,
        } => chat(&cli.server, &http, &login, &password, &to).await?,
    }
    Ok(())
}

async fn chat(
    server: &str,
    http: &reqwest::Client,
    login: &str,
    password: &str,
    to: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    // The peer's devices and registration ids come with its prekey bundle.
    let bundle: Value = http
        .get(format!("{server}/v1/keys/{to}/*"))
        .basic_auth(login, Some(password))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let devices: Vec<(u64, u64)> = bundle["devices"]
        .as_array()
        .ok_or("no devices")?
        .iter()
        .map(|d| {
            (
                d["deviceId"].as_u64().unwrap_or(1),
                d["registrationId"].as_u64().unwrap_or(1),
            )
        })
        .collect();

    let url = server.replacen("http", "ws", 1) + "/v1/websocket";
    let mut req = url.into_client_request()?;
    let token = STANDARD.encode(format!("{login}:{password}"));
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Basic {token}"))?,
    );
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    let (mut tx, mut rx) = ws.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut next_id = 1u64;
    println!("connected; type a line to send, Ctrl-D to quit");
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let frame = json!({
                    "op": "send", "id": next_id, "destination": to, "timestamp": now_ms(),
                    "messages": devices.iter().map(|(d, r)| json!({
                        "destinationDeviceId": d, "destinationRegistrationId": r,
                        "type": 1, "content": STANDARD.encode(line.as_bytes()),
                    })).collect::<Vec<_>>(),
                });
                next_id += 1;
                tx.send(Message::Text(frame.to_string())).await?;
            }
            frame = rx.next() => {
                let Some(frame) = frame else { break };
                let Message::Text(text) = frame? else { continue };
                let v: Value = serde_json::from_str(&text)?;
                match v["op"].as_str() {
                    Some("message") => {
                        let e = &v["envelope"];
                        let body = STANDARD.decode(e["content"].as_str().unwrap_or("")).unwrap_or_default();
                        println!("{}.{}: {}", e["source"].as_str().unwrap_or("?"), e["sourceDevice"], String::from_utf8_lossy(&body));
                        tx.send(Message::Text(json!({"op": "ack", "guid": e["guid"]}).to_string())).await?;
                    }
                    Some("queue-empty") => println!("(up to date)"),
                    Some("response") if v["status"] != 200 => println!("send failed: {}", v["body"]),
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
