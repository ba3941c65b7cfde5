//! The WebSocket upgrade leaves the HTTP dispatcher (`ws::takeover`): what
//! a client sees at that seam. Frames sent together with the handshake are
//! read; an upgrade the app refuses is answered like any request and the
//! connection closed; an `Upgrade` header on another path gets that path's
//! answer; a handshake with a body is refused. Raw sockets, so the bytes on
//! the wire are what is checked. Backend-independent: SQLite only.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const HANDSHAKE_HEADERS: &str = "Upgrade: websocket\r\n\
     Connection: Upgrade\r\n\
     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
     Sec-WebSocket-Version: 13\r\n";

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
}

/// Everything the server sends until it closes the connection.
fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    stream
        .read_to_end(&mut out)
        .expect("the server closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `request` on a fresh connection; everything the server answers
/// until it closes the connection.
fn ask(addr: SocketAddr, request: &str) -> String {
    let mut stream = connect(addr);
    stream.write_all(request.as_bytes()).expect("write");
    read_to_close(&mut stream)
}

/// A masked client frame (RFC 6455 §5.3) of fewer than 126 bytes.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one unmasked server frame of fewer than 126 bytes.
fn server_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).expect("frame head");
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = (head[1] & 0x7f) as usize;
    assert!(len < 126, "unexpectedly long frame");
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).expect("frame payload");
    (head[0] & 0x0f, payload)
}

/// Reads the response head, byte by byte, so nothing after it is consumed.
fn response_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A client that writes its first frames in the same segment as its
/// handshake (they reach the server in the HTTP parser's buffer) has them
/// read, in order, once the session starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_the_handshake_are_read() {
    let server = TestServer::start(Backend::Sqlite).await;
    let d = TestDevice::register(&server).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(addr);
        let mut bytes = format!(
            "GET /v1/websocket?login={}&password={} HTTP/1.1\r\nHost: {addr}\r\n{HANDSHAKE_HEADERS}\r\n",
            percent(&d.login()),
            percent(&d.password)
        )
        .into_bytes();
        bytes.extend(client_frame(0x9, b"first"));
        bytes.extend(client_frame(0x9, b"second"));
        stream.write_all(&bytes).expect("write");
        let head = response_head(&mut stream);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "a 101 carries no length: {head}"
        );
        let mut pongs = Vec::new();
        while pongs.len() < 2 {
            let (opcode, payload) = server_frame(&mut stream);
            // Text frames (queue-empty) may come between the pongs.
            if opcode == 0xA {
                pongs.push(String::from_utf8(payload).unwrap());
            }
        }
        assert_eq!(pongs, ["first", "second"]);
        // And the session goes on: a close is answered with a close.
        stream
            .write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
            .expect("close");
        loop {
            let (opcode, payload) = server_frame(&mut stream);
            if opcode == 0x8 {
                assert_eq!(&payload[..2], &1000u16.to_be_bytes());
                break;
            }
        }
    })
    .await
    .unwrap();
}

/// An upgrade the app refuses (a wrong password) gets the app's usual
/// answer, marked `Connection: close`, and the connection ends after it,
/// with a FIN: frames the client sent with its handshake, which nobody
/// reads, must not turn the close into a reset that destroys the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_is_answered_and_the_connection_closed() {
    let server = TestServer::start(Backend::Sqlite).await;
    let d = TestDevice::register(&server).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut request = format!(
            "GET /v1/websocket?login={}&password=wrong HTTP/1.1\r\nHost: {addr}\r\n{HANDSHAKE_HEADERS}\r\n",
            percent(&d.login()),
        )
        .into_bytes();
        // More than the HTTP parser reads at once (so some is still unread
        // in the kernel when the answer is written).
        for _ in 0..2048 {
            request.extend(client_frame(0x1, &[b'x'; 120]));
        }
        let mut stream = connect(addr);
        stream.write_all(&request).expect("write (the server reads on)");
        let answer = read_to_close(&mut stream);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        let lower = answer.to_ascii_lowercase();
        assert!(lower.contains("connection: close"), "{answer}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.parse().unwrap()))
            .expect("a content-length");
        assert_eq!(body.len(), length, "the whole body, then the end: {answer}");
        let json: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
        assert_eq!(json["error"], "unauthorized", "{json}");
    })
    .await
    .unwrap();
}

/// `Upgrade: websocket` on a path that is no WebSocket is served by that
/// path as usual (here: a device's key count, and an unknown path's 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_header_elsewhere_gets_that_paths_answer() {
    let server = TestServer::start(Backend::Sqlite).await;
    let d = TestDevice::register(&server).await;
    let addr = server.addr;
    let auth = b64(format!("{}:{}", d.login(), d.password).as_bytes());
    tokio::task::spawn_blocking(move || {
        let answer = ask(
            addr,
            &format!(
                "GET /v1/keys/count HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\n{HANDSHAKE_HEADERS}\r\n"
            ),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"count\""), "{answer}");

        let answer = ask(
            addr,
            &format!("GET /nowhere HTTP/1.1\r\nHost: {addr}\r\n{HANDSHAKE_HEADERS}\r\n"),
        );
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    })
    .await
    .unwrap();
}

/// A handshake with a chunked body is not taken for an upgrade by the HTTP
/// parser; it is refused with `400` rather than half-upgraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_a_body_is_refused() {
    let server = TestServer::start(Backend::Sqlite).await;
    let d = TestDevice::register(&server).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(addr);
        let request = format!(
            "GET /v1/websocket?login={}&password={} HTTP/1.1\r\nHost: {addr}\r\n{HANDSHAKE_HEADERS}\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            percent(&d.login()),
            percent(&d.password)
        );
        stream.write_all(request.as_bytes()).expect("write");
        let head = response_head(&mut stream);
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    })
    .await
    .unwrap();
}
