//! Two people agree on a key through courier from a short code they share
//! out of band (read out over the phone), without trusting the server: they
//! run SPAKE2 over a rendezvous channel, then exchange identity keys sealed
//! under the agreed key.
//!
//! ```sh
//! # One side: prints the channel and a fresh six-digit code to pass on.
//! cargo run --example rendezvous -- create
//! # The other side, with what the first one read out:
//! cargo run --example rendezvous -- join CHANNEL CODE
//! ```
//! `--server URL` names the server (`http://127.0.0.1:8080`); `--login` and
//! `--password` an account's device, else a throwaway account is registered.
//! Both sides print the other's identity key and a fingerprint of the agreed
//! key; with different codes the sealed keys do not open and both say so.
//! The identity keys here are the repository's libsignal test vectors; a real
//! app sends its own.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const VECTORS: &str = include_str!("../tests/data/libsignal-keys.json");

/// How long to wait for the other side.
const PATIENCE: Duration = Duration::from_secs(600);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Error = Box<dyn std::error::Error>;

#[derive(Parser)]
struct Cli {
    /// courier's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// `UUID` or `UUID.DEVICE` of an existing device (else a new account).
    #[arg(long, requires = "password")]
    login: Option<String>,
    #[arg(long)]
    password: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open a channel and wait for the other side.
    Create {
        /// The code to use (a fresh random six-digit one if omitted).
        #[arg(long)]
        code: Option<String>,
    },
    /// Join the channel the other side created.
    Join { channel: String, code: String },
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let cli = Cli::parse();
    let http = reqwest::Client::new();
    let (login, password) = match (cli.login, cli.password) {
        (Some(login), Some(password)) => (login, password),
        _ => register(&http, &cli.server).await?,
    };
    let (channel, code, role) = match cli.command {
        Cmd::Create { code } => {
            let res = http
                .post(format!("{}/v1/rendezvous", cli.server))
                .basic_auth(&login, Some(&password))
                .send()
                .await?;
            let body: Value = res.error_for_status()?.json().await?;
            let channel = body["channel"].as_str().ok_or("no channel")?.to_owned();
            let code = code.unwrap_or_else(|| format!("{:06}", OsRng.gen_range(0..1_000_000)));
            println!("channel {channel}, code {code}");
            println!("on the other side: cargo run --example rendezvous -- join {channel} {code}");
            (channel, code, Role::A)
        }
        Cmd::Join { channel, code } => (channel, code, Role::B),
    };
    let mut ws = join(&cli.server, &channel, &login, &password).await?;
    let mine = identity_key(role);
    match tokio::time::timeout(PATIENCE, agree(&mut ws, role, &code, &mine)).await {
        Err(_) => println!("the other side did not come"),
        Ok(Err(e)) => println!("failed: {e}"),
        Ok(Ok(Agreed {
            fingerprint,
            theirs,
        })) => {
            println!("agreed key fingerprint: {fingerprint}");
            match theirs {
                Some(key) => println!("their identity key: {}", STANDARD.encode(key)),
                None => println!(
                    "their identity key does not open: the codes differ (or someone in \
                     the middle guessed wrong). Do not trust this exchange."
                ),
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The side that created the channel.
    A,
    B,
}

struct Agreed {
    fingerprint: String,
    theirs: Option<Vec<u8>>,
}

/// SPAKE2 over the channel, then each side's identity key sealed under the
/// agreed key. Both sides send first and then read, so neither waits on the
/// other to start; the server holds what is sent before the other joins.
async fn agree(ws: &mut Socket, role: Role, code: &str, mine: &[u8]) -> Result<Agreed, Error> {
    let (a, b) = (Identity::new(b"courier-a"), Identity::new(b"courier-b"));
    let password = Password::new(code.as_bytes());
    let (spake, outbound) = match role {
        Role::A => Spake2::<Ed25519Group>::start_a(&password, &a, &b),
        Role::B => Spake2::<Ed25519Group>::start_b(&password, &a, &b),
    };
    ws.send(Message::Binary(outbound)).await?;
    let inbound = next_binary(ws).await?;
    let key = spake
        .finish(&inbound)
        .map_err(|e| format!("SPAKE2: {e:?}"))?;

    let mut okm = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(None, &key)
        .expand(b"courier rendezvous example: identity key seal", &mut okm)
        .map_err(|_| "HKDF")?;
    let cipher = ChaCha20Poly1305::new(&okm.into());
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut sealed = nonce.to_vec();
    sealed.extend(cipher.encrypt(&nonce, mine).map_err(|_| "seal")?);
    ws.send(Message::Binary(sealed)).await?;

    let theirs = next_binary(ws).await?;
    let theirs = (theirs.len() > 12)
        .then(|| {
            let (nonce, ciphertext) = theirs.split_at(12);
            cipher.decrypt(Nonce::from_slice(nonce), ciphertext).ok()
        })
        .flatten();
    // Something both can read out to compare, which says nothing of the key.
    let fingerprint = Sha256::digest([b"fingerprint".as_slice(), &okm].concat())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Agreed {
        fingerprint,
        theirs,
    })
}

/// The next binary frame; the server's text frames are printed.
async fn next_binary(ws: &mut Socket) -> Result<Vec<u8>, Error> {
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Binary(bytes) => return Ok(bytes),
            Message::Text(text) => match serde_json::from_str::<Value>(&text)?["op"].as_str() {
                Some("peer-joined") => println!("the other side is here"),
                Some("peer-left") => return Err("the other side left".into()),
                _ => println!("server: {text}"),
            },
            Message::Close(reason) => return Err(format!("closed: {reason:?}").into()),
            _ => {}
        }
    }
    Err("connection ended".into())
}

async fn join(server: &str, channel: &str, login: &str, password: &str) -> Result<Socket, Error> {
    let url = server
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1)
        + "/v1/rendezvous/"
        + channel;
    let mut req = url.into_client_request()?;
    let token = STANDARD.encode(format!("{login}:{password}"));
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Basic {token}"))?,
    );
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(ws)
}

/// A throwaway account (no keys uploaded: the rendezvous needs none).
async fn register(http: &reqwest::Client, server: &str) -> Result<(String, String), Error> {
    let password = format!("rendezvous-example-{:032x}", OsRng.gen::<u128>());
    let body: Value = http
        .post(format!("{server}/v1/accounts"))
        .json(&json!({"password": password, "registrationId": OsRng.gen_range(1..16380)}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let uuid = body["uuid"].as_str().ok_or("no uuid")?.to_owned();
    Ok((uuid, password))
}

/// This side's identity key (a libsignal test vector).
fn identity_key(role: Role) -> Vec<u8> {
    let vectors: Value = serde_json::from_str(VECTORS).unwrap_or_default();
    let index = if role == Role::A { 0 } else { 1 };
    vectors["valid"][index]["identityKey"]
        .as_str()
        .and_then(|k| STANDARD.decode(k).ok())
        .unwrap_or_default()
}
