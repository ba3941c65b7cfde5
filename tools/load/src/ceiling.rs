//! The physical ceiling: a bare WebSocket relay built into the tool, driven
//! by the very same relay client code as courier.
//!
//! It does the least a relay can: no authentication (it only reads the
//! login from the Basic header to know who is connecting), no storage, no
//! device sets. Per send frame it parses just enough to find the
//! destination, id and content, pushes a `message` frame with a fresh guid
//! to the destination's connection, and answers the sender `200 delivered`
//! when the destination's ack comes back — the same round trip courier's
//! live path makes. "courier's max rate / ceiling's max rate" says how much
//! of the machine's loopback-and-JSON budget courier's guarantees cost.
//!
//! It runs as a child process: the tool starts its own executable again
//! with the hidden subcommand `ceiling-serve`, exactly as it starts
//! `courier serve`. That way the server CPU per relayed message is read the
//! same way for both (`utime + stime` of the process, see [`crate::cpu`]),
//! and it counts every thread the relay ever ran, which per-thread readings
//! of the tool's own `/proc/self/task/*` would not once a thread exits;
//! nor do the relay and the load clients share an allocator. The child
//! exits when its stdin closes, so it cannot outlive the tool.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "ceiling-serve";

/// The line the child prints on stdout once it accepts connections.
const READY: &str = "ceiling listening on ";

/// A running bare relay (a child process); stopped on drop.
pub struct Ceiling {
    pub addr: SocketAddr,
    child: Child,
}

impl Ceiling {
    /// Starts the relay (this executable, `ceiling-serve`) on 127.0.0.1:0
    /// with a runtime of `threads` workers, and waits until it listens.
    pub fn start(threads: usize) -> anyhow::Result<Ceiling> {
        let exe = std::env::current_exe().context("own path")?;
        let mut child = Command::new(&exe)
            .args([SUBCOMMAND, "--threads", &threads.max(1).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start the ceiling relay ({})", exe.display()))?;
        let stdout = child.stdout.take().context("ceiling stdout")?;
        // One line, printed within milliseconds; EOF if the child failed.
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let addr = line
            .trim()
            .strip_prefix(READY)
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the ceiling relay did not start ({read:?}, said {line:?})");
        };
        Ok(Ceiling { addr, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        // Closing stdin asks it to exit; SIGKILL if it has not within 2 s.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side (`courier-load ceiling-serve`): serves on 127.0.0.1:0,
/// announces the address on stdout, and returns when stdin closes.
pub fn serve_child(threads: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("ceiling")
        .enable_all()
        .build()
        .context("ceiling runtime")?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("ceiling-stdin".into())
        .spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            let _ = stop_tx.send(());
        })
        .context("stdin watcher")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the ceiling relay")?;
        let addr = listener.local_addr().context("local addr")?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{READY}{addr}").context("announce the address")?;
        out.flush().context("announce the address")?;
        drop(out);
        let hub = Arc::new(Hub::default());
        tokio::select! {
            _ = accept_loop(listener, hub) => {}
            _ = stop_rx => {}
        }
        anyhow::Ok(())
    })?;
    // Dropping the runtime ends every connection task.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

type Outbox = mpsc::UnboundedSender<Message>;

/// Who is connected, and which sender waits for which guid's ack.
#[derive(Default)]
struct Hub {
    connections: Mutex<HashMap<String, (u64, Outbox)>>,
    waiting: Mutex<HashMap<u128, (Outbox, u64)>>,
    next_guid: AtomicU64,
    next_conn: AtomicU64,
}

async fn accept_loop(listener: TcpListener, hub: Arc<Hub>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, hub.clone()));
            }
            // Out of descriptors or similar: back off instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// The account uuid from `Authorization: Basic base64(UUID.1:secret)`.
fn login_of(request: &Request) -> Option<String> {
    let header = request.headers().get("authorization")?.to_str().ok()?;
    let decoded = B64.decode(header.strip_prefix("Basic ")?).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split(':').next()?;
    Some(user.split('.').next()?.to_owned())
}

#[derive(Deserialize)]
struct InFrame<'a> {
    op: &'a str,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    destination: Option<&'a str>,
    #[serde(default)]
    guid: Option<&'a str>,
    #[serde(default)]
    timestamp: Option<u64>,
    #[serde(default, borrow)]
    messages: Vec<InCopy<'a>>,
}

#[derive(Deserialize)]
struct InCopy<'a> {
    #[serde(default)]
    r#type: u32,
    content: &'a str,
}

// tungstenite's handshake callback type fixes the (large) error type.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, hub: Arc<Hub>) {
    let mut me = None;
    let callback = |req: &Request, res: Response| -> Result<Response, ErrorResponse> {
        me = login_of(req);
        if me.is_some() {
            Ok(res)
        } else {
            let mut e = ErrorResponse::new(Some("no login".into()));
            *e.status_mut() = StatusCode::UNAUTHORIZED;
            Err(e)
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let Some(me) = me else { return };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let conn_id = hub.next_conn.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut c) = hub.connections.lock() {
        c.insert(me.clone(), (conn_id, tx.clone()));
    }
    let _ = tx.send(Message::Text(r#"{"op":"queue-empty"}"#.into()));

    // Writer: everything for this connection goes through its outbox, in
    // batches of whatever is queued.
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });

    while let Some(Ok(msg)) = source.next().await {
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        let Ok(frame) = serde_json::from_str::<InFrame>(&text) else {
            let _ = tx.send(Message::Text(
                r#"{"op":"error","message":"not a frame"}"#.into(),
            ));
            continue;
        };
        match (frame.op, frame.id) {
            ("send", Some(id)) => relay(&hub, &me, &tx, id, &frame),
            ("ack", _) => {
                let Some(guid) = frame.guid.and_then(|g| uuid::Uuid::parse_str(g).ok()) else {
                    continue;
                };
                let waiter = hub
                    .waiting
                    .lock()
                    .ok()
                    .and_then(|mut w| w.remove(&guid.as_u128()));
                if let Some((sender, id)) = waiter {
                    let _ = sender.send(Message::Text(format!(
                        concat!(
                            r#"{{"op":"response","id":{},"status":200,"body":{{"results":"#,
                            r#"[{{"deviceId":1,"guid":"{}","status":"delivered"}}]}}}}"#
                        ),
                        id, guid
                    )));
                }
            }
            _ => {}
        }
    }
    if let Ok(mut c) = hub.connections.lock() {
        if c.get(&me).is_some_and(|(id, _)| *id == conn_id) {
            c.remove(&me);
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Pushes one send's copy to its destination and remembers who waits.
fn relay(hub: &Hub, me: &str, tx: &Outbox, id: u64, frame: &InFrame<'_>) {
    let destination = frame
        .destination
        .and_then(|d| hub.connections.lock().ok()?.get(d).map(|(_, o)| o.clone()));
    let (Some(dest), Some(copy)) = (destination, frame.messages.first()) else {
        let _ = tx.send(Message::Text(format!(
            r#"{{"op":"response","id":{id},"status":404,"body":{{"error":"not_found","message":"destination not connected"}}}}"#
        )));
        return;
    };
    let guid = uuid::Uuid::from_u128(
        (0x4000_8000u128 << 64) | hub.next_guid.fetch_add(1, Ordering::Relaxed) as u128,
    );
    if let Ok(mut w) = hub.waiting.lock() {
        w.insert(guid.as_u128(), (tx.clone(), id));
    }
    let now = crate::client::epoch_ms();
    let _ = dest.send(Message::Text(format!(
        concat!(
            r#"{{"op":"message","envelope":{{"guid":"{}","source":"{}","sourceDevice":1,"#,
            r#""type":{},"timestamp":{},"serverTimestamp":{},"content":"{}"}}}}"#
        ),
        guid,
        me,
        copy.r#type,
        frame.timestamp.unwrap_or(now),
        now,
        copy.content
    )));
}
