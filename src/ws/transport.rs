//! The WebSocket byte stream, decoupled from the session actor.
//!
//! actix-web-actors runs a session actor *inside* the response body, so the
//! actor (its timers, its mailbox) only runs while the dispatcher polls that
//! body, and the dispatcher stops polling it once ~32 KiB of output wait for
//! a peer that does not read. A phone whose radio died would freeze its
//! session: no ack deadlines, no heartbeat, no replacement. Here the session
//! is an ordinary actor; the response body only drains an [`Outbox`] that the
//! session fills, and that tells it how much is unsent and since when
//! nothing was written, so the session can give up on a stalled peer. The
//! request payload is decoded into frames by [`Inbox`], read only while the
//! session's gate is open (backpressure). Framing is actix-http's `Codec`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{CloseReason, Codec, Frame, Message, OpCode, Parser, ProtocolError};
use actix_web::error::PayloadError;
use actix_web::web::{Bytes, BytesMut};
use futures_util::Stream;

/// The descriptor of a connection's socket, noted when the connection is
/// accepted (see [`remember_socket`]), so a session can cut a connection
/// whose peer stopped reading: the HTTP dispatcher is then parked on a write
/// that never completes and would hold the connection until the kernel gives
/// up (many minutes; never, while the peer's window stays shut).
///
/// Only the number is kept (a duplicate would double every connection's
/// descriptors), so it is used only through [`Outbox::cut`], which checks
/// that the response body is still alive: the body lives inside the
/// dispatcher that owns the socket, on this same thread, so while the body
/// exists the descriptor is open and cannot have been reused.
#[derive(Clone, Copy, Debug)]
pub struct ConnSocket(RawFd);

/// `HttpServer::on_connect` hook: notes each TCP connection's descriptor in
/// the connection's data.
pub fn remember_socket(conn: &dyn std::any::Any, data: &mut actix_web::dev::Extensions) {
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        data.insert(ConnSocket(tcp.as_raw_fd()));
    }
}

struct OutboxState {
    frames: VecDeque<Bytes>,
    unsent: usize,
    /// When the body last handed bytes to the dispatcher (or the outbox last
    /// went from empty to non-empty): "no write progress since".
    progress: Instant,
    waker: Option<Waker>,
    /// No more frames will come: the body ends once `frames` is empty.
    finished: bool,
    /// The dispatcher still holds the body (and so the socket).
    body_alive: bool,
    codec: Codec,
}

impl OutboxState {
    /// Queues one encoded frame and wakes the body.
    fn push(&mut self, frame: Bytes) {
        if self.frames.is_empty() {
            self.progress = Instant::now();
        }
        self.unsent += frame.len();
        self.frames.push_back(frame);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// The session's side of the outgoing byte stream.
#[derive(Clone)]
pub struct Outbox(Rc<RefCell<OutboxState>>);

/// The response body: yields what the session queued, as it is written.
pub struct OutboxBody(Rc<RefCell<OutboxState>>);

impl Outbox {
    pub fn new() -> (Outbox, OutboxBody) {
        let state = Rc::new(RefCell::new(OutboxState {
            frames: VecDeque::new(),
            unsent: 0,
            progress: Instant::now(),
            waker: None,
            finished: false,
            body_alive: true,
            codec: Codec::new(),
        }));
        (Outbox(state.clone()), OutboxBody(state))
    }

    fn queue(&self, message: Message) {
        let mut s = self.0.borrow_mut();
        if s.finished {
            return;
        }
        let s = &mut *s;
        // Each frame in a buffer of its own (the writer reserves exactly its
        // size): a shared scratch buffer whose earlier frames are still
        // queued cannot be reused, and growing it allocated ever larger
        // blocks (a visible cost in malloc).
        let mut frame = BytesMut::new();
        if s.codec.encode(message, &mut frame).is_err() {
            return;
        }
        s.push(frame.freeze());
    }

    /// Queues a text frame. Written here with actix-http's own frame writer
    /// rather than as a `Message::Text` through the codec: turning the
    /// `String` into a `ByteString` allocated a shared header for every
    /// frame (its capacity is rarely its length).
    pub fn text(&self, text: String) {
        let mut s = self.0.borrow_mut();
        if s.finished {
            return;
        }
        let mut frame = BytesMut::new();
        // A server's frames are not masked (RFC 6455 §5.1).
        Parser::write_message(&mut frame, text.as_bytes(), OpCode::Text, true, false);
        s.push(frame.freeze());
    }

    pub fn binary(&self, bytes: Bytes) {
        self.queue(Message::Binary(bytes));
    }

    pub fn ping(&self) {
        self.queue(Message::Ping(Bytes::new()));
    }

    pub fn pong(&self, payload: Bytes) {
        self.queue(Message::Pong(payload));
    }

    /// Queues a close frame; nothing queued after it is sent.
    pub fn close(&self, reason: Option<CloseReason>) {
        self.queue(Message::Close(reason));
        self.finish();
    }

    /// Ends the body once what is queued has been written.
    pub fn finish(&self) {
        let mut s = self.0.borrow_mut();
        s.finished = true;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    /// Bytes queued but not yet taken by the dispatcher.
    pub fn unsent(&self) -> usize {
        self.0.borrow().unsent
    }

    /// How long output has waited with no write progress (zero when the
    /// outbox is empty).
    pub fn stalled_for(&self) -> Duration {
        let s = self.0.borrow();
        if s.frames.is_empty() {
            Duration::ZERO
        } else {
            s.progress.elapsed()
        }
    }

    /// Everything queued has been handed to the dispatcher.
    pub fn is_drained(&self) -> bool {
        self.0.borrow().frames.is_empty()
    }

    /// Shuts the connection down in both directions, if the dispatcher still
    /// holds it (see [`ConnSocket`]): the parked write then fails, which ends
    /// the dispatcher and closes the socket; the peer sees the connection
    /// end. Nothing more is queued.
    pub fn cut(&self, socket: ConnSocket) {
        self.finish();
        if self.0.borrow().body_alive {
            let _ = nix::sys::socket::shutdown(socket.0, nix::sys::socket::Shutdown::Both);
        }
    }
}

/// After a session has stopped: a peer that does not read never takes the
/// close frame, so the connection is reset `grace` later if what was queued
/// has still not been written, instead of leaving the dispatcher parked on it.
pub fn finish_or_cut(outbox: &Outbox, socket: Option<ConnSocket>, grace: Duration) {
    outbox.finish();
    if let (false, Some(socket)) = (outbox.is_drained(), socket) {
        let outbox = outbox.clone();
        actix::spawn(async move {
            tokio::time::sleep(grace).await;
            if !outbox.is_drained() {
                outbox.cut(socket);
            }
        });
    }
}

impl Drop for OutboxBody {
    fn drop(&mut self) {
        self.0.borrow_mut().body_alive = false;
    }
}

impl Stream for OutboxBody {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut s = self.0.borrow_mut();
        match s.frames.pop_front() {
            Some(frame) => {
                s.unsent -= frame.len();
                s.progress = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            None if s.finished => Poll::Ready(None),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Decodes the request payload into WebSocket frames, one at a time, pulling
/// more bytes only when the buffer holds no whole frame (so a paused reader
/// stops the socket being read). A protocol error ends the stream.
pub struct Inbox<S> {
    payload: S,
    buf: BytesMut,
    codec: Codec,
    done: bool,
}

impl<S> Inbox<S> {
    /// `max_frame`: the largest frame accepted; a bigger one is an error.
    pub fn new(payload: S, max_frame: usize) -> Self {
        Inbox {
            payload,
            buf: BytesMut::new(),
            codec: Codec::new().max_size(max_frame),
            done: false,
        }
    }
}

impl<S> Stream for Inbox<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Frame, ProtocolError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.codec.decode(&mut this.buf) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    this.buf.clear();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.payload).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => this.buf.extend_from_slice(&bytes),
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(std::io::Error::other(e)))));
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
