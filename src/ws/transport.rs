//! The WebSocket byte stream, decoupled from the session actor.
//!
//! Once the handshake is answered the connection leaves actix-http's HTTP/1
//! dispatcher (see [`super::takeover`]): the socket comes here, and nothing
//! of the dispatcher (its two 8 KiB buffers, its task) is kept for the life
//! of the connection. What stays per connection is small and mostly empty
//! while the peer is idle: an [`Inbox`] whose read buffer exists only while
//! a frame is being read, and an [`Outbox`] whose frames are written by a
//! small task of their own straight from the queue (a burst of frames
//! shares one buffer, which is let go once written).
//!
//! The session is an ordinary actor: it is not polled by whoever writes its
//! output, so a peer that stops reading cannot freeze its timers (ack
//! deadlines, heartbeat, replacement). The outbox tells the session how much
//! is unsent and since when nothing was written, so it can give up on a
//! stalled peer and [cut](Outbox::cut) the connection. The inbox reads only
//! while the session's gate is open (backpressure). Framing is actix-http's
//! `Codec`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read as _};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{CloseReason, Codec, Frame, Message, OpCode, Parser, ProtocolError};
use actix_web::rt::net::TcpStream;
use actix_web::web::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::Interest;

use crate::clock::Tick;
use crate::service::state::{OpenConnections, OpenGuard};

/// An upgraded connection, as the handshake leaves it: the socket, and any
/// bytes the peer sent after its request (its first frames, if it did not
/// wait for the answer).
pub struct Connection {
    pub io: TcpStream,
    pub read: BytesMut,
}

/// Splits an upgraded connection into the session's two ends and starts the
/// task that writes the outbox (on this thread). `max_frame`: the largest
/// frame accepted from the peer.
pub fn open(conn: Connection, max_frame: usize, open: &OpenConnections) -> (Inbox, Outbox) {
    let io = Rc::new(conn.io);
    let (outbox, state) = Outbox::new(Rc::downgrade(&io));
    actix::spawn(write_out(io.clone(), state, open.open()));
    let inbox = Inbox {
        io,
        buf: conn.read,
        borrowed: false,
        codec: Codec::new().max_size(max_frame),
        done: false,
    };
    (inbox, outbox)
}

struct OutboxState {
    /// Full buffers of encoded frames, oldest first, all to be written
    /// before `tail`.
    frames: VecDeque<Bytes>,
    /// The newest frames, encoded one after another into one buffer: a
    /// burst of frames queued before the writer runs (a batch of answers,
    /// several copies for one device) costs one allocation, not one per
    /// frame. Let go whenever everything queued has been written, so an
    /// idle connection holds none; moved to `frames` once it holds
    /// [`TAIL_MAX`] bytes, so it does not grow by copying without bound.
    tail: BytesMut,
    unsent: usize,
    /// When bytes were last written to the socket (or the outbox last went
    /// from empty to non-empty): "no write progress since".
    progress: Tick,
    /// The writer, waiting for frames.
    waker: Option<Waker>,
    /// No more frames will come: the writer ends once all is written.
    finished: bool,
    /// The socket, for [`Outbox::cut`], while the writer or the inbox still
    /// holds it (a descriptor number could name another connection's
    /// socket once this one is closed).
    socket: Weak<TcpStream>,
    codec: Codec,
}

/// The most bytes of frames [`OutboxState::tail`] gathers before a frame
/// after them starts a new buffer.
const TAIL_MAX: usize = 16 * 1024;

impl OutboxState {
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.tail.is_empty()
    }

    /// Queues one frame, which `encode` appends to the tail (with the
    /// codec, if it needs one), and wakes the writer. A frame that `encode`
    /// refuses queues nothing.
    fn push(&mut self, encode: impl FnOnce(&mut Codec, &mut BytesMut) -> bool) {
        if self.finished {
            return;
        }
        let was_empty = self.is_empty();
        if self.tail.len() >= TAIL_MAX {
            self.frames.push_back(self.tail.split().freeze());
        }
        let before = self.tail.len();
        if !encode(&mut self.codec, &mut self.tail) {
            self.tail.truncate(before);
            return;
        }
        if was_empty {
            self.progress = Tick::now();
        }
        self.unsent += self.tail.len() - before;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// `n` bytes from the front of the queue were written.
    fn written(&mut self, mut n: usize) {
        self.unsent -= n;
        self.progress = Tick::now();
        while n > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.frames.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        if n > 0 {
            self.tail.advance(n);
        }
        if self.tail.is_empty() {
            // Its storage let go (it may be large, and nothing is queued
            // in it any more). Not kept for the next burst: a connection
            // that has gone quiet would hold it while idle.
            self.tail = BytesMut::new();
        }
    }

    /// The writer cannot go on: nothing more is queued or written.
    fn fail(&mut self) {
        self.finished = true;
        self.frames.clear();
        self.tail = BytesMut::new();
        self.unsent = 0;
    }
}

/// The session's side of the outgoing byte stream.
#[derive(Clone)]
pub struct Outbox(Rc<RefCell<OutboxState>>);

impl Outbox {
    fn new(socket: Weak<TcpStream>) -> (Outbox, Rc<RefCell<OutboxState>>) {
        let state = Rc::new(RefCell::new(OutboxState {
            frames: VecDeque::new(),
            tail: BytesMut::new(),
            unsent: 0,
            progress: Tick::now(),
            waker: None,
            finished: false,
            socket,
            codec: Codec::new(),
        }));
        (Outbox(state.clone()), state)
    }

    fn queue(&self, message: Message) {
        self.0
            .borrow_mut()
            .push(|codec, out| codec.encode(message, out).is_ok());
    }

    /// Queues a text frame. Written here with actix-http's own frame writer
    /// rather than as a `Message::Text` through the codec: turning the
    /// `String` into a `ByteString` allocated a shared header for every
    /// frame (its capacity is rarely its length).
    pub fn text(&self, text: &str) {
        self.0.borrow_mut().push(|_, out| {
            // A server's frames are not masked (RFC 6455 §5.1).
            Parser::write_message(out, text.as_bytes(), OpCode::Text, true, false);
            true
        });
    }

    /// Queues the text frame `write` writes, written first into the
    /// thread's scratch string, so that the frame needs no `String` of its
    /// own (the frame header, written first, needs the text's length).
    /// `write` must not queue frames itself.
    pub fn text_with(&self, write: impl FnOnce(&mut String)) {
        TEXT_SCRATCH.with_borrow_mut(|text| {
            text.clear();
            write(text);
            self.text(text);
            if text.capacity() > TEXT_SCRATCH_KEPT {
                // A large frame's buffer is not kept for the thread's life.
                *text = String::new();
            }
        });
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

    /// Ends the connection once what is queued has been written.
    pub fn finish(&self) {
        let mut s = self.0.borrow_mut();
        s.finished = true;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    /// Bytes queued but not yet written to the socket.
    pub fn unsent(&self) -> usize {
        self.0.borrow().unsent
    }

    /// How long output has waited with no write progress (zero when the
    /// outbox is empty).
    pub fn stalled_for(&self) -> Duration {
        let s = self.0.borrow();
        if s.is_empty() {
            Duration::ZERO
        } else {
            s.progress.elapsed()
        }
    }

    /// Everything queued has been written.
    pub fn is_drained(&self) -> bool {
        self.0.borrow().is_empty()
    }

    /// Resets the connection at once (the peer is not reading): the
    /// writer's parked write fails and the inbox ends, and when the socket
    /// closes the peer gets a reset, and the kernel drops what it still
    /// held for it (a FIN would wait behind that unread data for minutes).
    /// Nothing more is queued.
    pub fn cut(&self) {
        self.finish();
        let socket = self.0.borrow().socket.upgrade();
        if let Some(io) = socket {
            let sock = socket2::SockRef::from(&*io);
            let _ = sock.set_linger(Some(Duration::ZERO));
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

thread_local! {
    /// Where [`Outbox::text_with`] writes a frame's text before framing it.
    static TEXT_SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The largest scratch string kept between frames.
const TEXT_SCRATCH_KEPT: usize = 64 * 1024;

/// After a session has stopped: a peer that does not read never takes the
/// close frame, so the connection is reset `grace` later if what was queued
/// has still not been written, instead of leaving the writer parked on it.
pub fn finish_or_cut(outbox: &Outbox, grace: Duration) {
    outbox.finish();
    if !outbox.is_drained() {
        let outbox = outbox.clone();
        actix::spawn(async move {
            tokio::time::sleep(grace).await;
            if !outbox.is_drained() {
                outbox.cut();
            }
        });
    }
}

/// Frames written in one `writev`, at most.
const MAX_WRITE_FRAMES: usize = 64;

/// How long a finished connection keeps reading (and dropping) what the peer
/// still sends, so that its close frame or last bytes are not answered with
/// a reset, which could destroy our own close frame before the peer read it.
const LINGER: Duration = Duration::from_secs(2);

/// The outbox's writer: writes queued frames as they come, several to a
/// system call, straight from the queue (no copy into a write buffer).
/// Ends when the outbox is finished and written, or on a write error; then
/// half-closes and lingers (see [`linger`]).
async fn write_out(io: Rc<TcpStream>, state: Rc<RefCell<OutboxState>>, open: OpenGuard) {
    let result = write_frames(&io, &state).await;
    // Written (or failed): a graceful shutdown need not wait for the linger.
    drop(open);
    match result {
        // Boxed: only a connection that gets this far pays for its state,
        // not every idle writer task.
        Ok(()) => Box::pin(linger(&io)).await,
        Err(_) => {
            state.borrow_mut().fail();
            // The inbox (if the session still reads) sees the connection end.
            let _ = socket2::SockRef::from(&*io).shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Half-closes a connection whose last bytes are written, then reads and
/// drops what the peer still sends until it closes, for at most [`LINGER`]:
/// closing with unread input would answer with a reset, which can destroy
/// our last bytes before the peer has read them.
pub async fn linger(io: &TcpStream) {
    let _ = socket2::SockRef::from(io).shutdown(std::net::Shutdown::Write);
    let _ = tokio::time::timeout(LINGER, discard_until_eof(io)).await;
}

async fn write_frames(io: &TcpStream, state: &RefCell<OutboxState>) -> io::Result<()> {
    loop {
        let more = futures_util::future::poll_fn(|cx| {
            let mut s = state.borrow_mut();
            if !s.is_empty() {
                Poll::Ready(true)
            } else if s.finished {
                Poll::Ready(false)
            } else {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if !more {
            return Ok(());
        }
        io.writable().await?;
        let written = {
            let s = state.borrow();
            let mut slices = [IoSlice::new(&[]); MAX_WRITE_FRAMES];
            let mut n = 0;
            let tail = (!s.tail.is_empty()).then_some(&s.tail[..]);
            let queued = s.frames.iter().map(|f| &f[..]).chain(tail);
            for (slot, frame) in slices.iter_mut().zip(queued) {
                *slot = IoSlice::new(frame);
                n += 1;
            }
            io.try_write_vectored(&slices[..n])
        };
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => state.borrow_mut().written(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads and drops whatever the peer still sends, until it closes.
async fn discard_until_eof(io: &TcpStream) {
    loop {
        if io.readable().await.is_err() {
            return;
        }
        match READ_SCRATCH.with_borrow_mut(|s| io.try_read(&mut s.chunk)) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// The most read from the socket at once.
const READ_CHUNK: usize = 8 * 1024;

/// Every connection of a thread reads through these.
struct ReadScratch {
    /// What a read lands in: one buffer, zeroed once (a fresh 8 KiB buffer
    /// per read cost a large allocation each time, one on the stack would
    /// be zeroed each time).
    chunk: Box<[u8]>,
    /// Where a read into an empty inbox is copied to, to become the inbox's
    /// buffer: its frames share this storage, and are handled before the
    /// thread's next read in the usual case, which then reuses it
    /// ([`BytesMut::try_reclaim`]). Copying each read into a buffer of its
    /// own cost an allocation per read, a large one (glibc consolidates its
    /// free lists for each) whenever it held several frames.
    frames: BytesMut,
}

thread_local! {
    static READ_SCRATCH: RefCell<ReadScratch> = RefCell::new(ReadScratch {
        chunk: vec![0; READ_CHUNK].into_boxed_slice(),
        frames: BytesMut::new(),
    });
}

/// `frames` with room for `n` more bytes: its storage reclaimed if nothing
/// holds part of it any more, else new storage (an inbox still holding
/// frames from an earlier read keeps the old storage until they are
/// handled, or copied out, see [`Inbox::detach`]).
fn frames_with_room(frames: &mut BytesMut, n: usize) {
    if !frames.try_reclaim(n) {
        // Made empty and grown, not `with_capacity`: a `BytesMut` split
        // from storage made with a capacity grows any copy of itself to
        // at least that capacity, so a partial frame copied out of this
        // would take 8 KiB.
        *frames = BytesMut::new();
        frames.reserve(READ_CHUNK);
    }
}

/// Reads what the socket holds (up to [`READ_CHUNK`]) onto the end of
/// `buf`; `borrowed` is set when `buf` was empty and now shares the
/// thread's frame storage. A read that fills less than the chunk has
/// drained the socket, so it clears the socket's readiness as tokio's own
/// `poll_read` does (epoll is edge-triggered: bytes arriving later make it
/// ready again). `try_read` would clear it only on a second read that says
/// "would block": one system call more on every wakeup, a visible share of
/// the server's CPU in an open-loop relay.
fn read_into(io: &TcpStream, buf: &mut BytesMut, borrowed: &mut bool) -> io::Result<usize> {
    READ_SCRATCH.with_borrow_mut(|s| {
        let chunk = &mut s.chunk;
        let mut got = 0;
        let result = io.try_io(Interest::READABLE, || {
            let n = (&*socket2::SockRef::from(io)).read(chunk)?;
            got = n;
            if n > 0 && n < chunk.len() {
                // Drained: tell tokio so (it clears readiness on this).
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        let read = &s.chunk[..got];
        if buf.is_empty() && got > 0 {
            frames_with_room(&mut s.frames, got);
            s.frames.extend_from_slice(read);
            *buf = s.frames.split_to(got);
            *borrowed = true;
        } else {
            buf.extend_from_slice(read);
        }
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
            other => other,
        }
    })
}

/// A frame's payload that may be held a while (relayed to another
/// session): copied if it may share the thread's frame storage (which is
/// reused once the frames read into it are gone).
pub fn owned(payload: Bytes) -> Bytes {
    if payload.len() <= READ_CHUNK {
        Bytes::copy_from_slice(&payload)
    } else {
        payload
    }
}

/// Decodes the socket's bytes into WebSocket frames, one at a time, reading
/// more only when the buffer holds no whole frame (so a paused reader stops
/// the socket being read). A protocol error ends the stream. The buffer
/// holds only what was read and not yet decoded, and is let go whenever it
/// is empty and the socket has nothing to read: an idle connection holds
/// none. A read into an empty buffer becomes a view of the thread's frame
/// storage (see [`ReadScratch`]); what is left in it when the socket is
/// drained or the gate closes is copied out ([`Inbox::detach`]), so a
/// waiting connection never holds that storage.
pub struct Inbox {
    io: Rc<TcpStream>,
    buf: BytesMut,
    /// `buf` is a view of the thread's frame storage.
    borrowed: bool,
    codec: Codec,
    done: bool,
}

impl Inbox {
    /// Lets go of the thread's frame storage: what is left of a read that
    /// came into it is copied out, and an empty buffer is let go. Called
    /// whenever the inbox will not be read for a while (the socket is
    /// drained, or the session's gate is closed), so that no connection
    /// holds that storage while it waits.
    pub fn detach(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        } else if self.borrowed && self.buf.capacity() == self.buf.len() {
            // Still a view of the storage: whole frames not yet taken, or
            // part of a frame's head. (Once the codec has reserved room for
            // the rest of a frame, the buffer is a copy of its own.)
            self.buf = BytesMut::from(&self.buf[..]);
        }
        self.borrowed = false;
    }
}

impl Stream for Inbox {
    type Item = Result<Frame, ProtocolError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.codec.decode(&mut this.buf) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    this.buf = BytesMut::new();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.io.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(e))));
                }
                Poll::Pending => {
                    this.detach();
                    return Poll::Pending;
                }
            }
            match read_into(&this.io, &mut this.buf, &mut this.borrowed) {
                Ok(0) => this.done = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(e))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything queued, as one byte string in queue order.
    fn queued(state: &RefCell<OutboxState>) -> Vec<u8> {
        let s = state.borrow();
        let mut all: Vec<u8> = s.frames.iter().flat_map(|f| f.to_vec()).collect();
        all.extend_from_slice(&s.tail);
        all
    }

    /// The frames in `bytes`, decoded as a client reads them.
    fn decode(bytes: &[u8]) -> Vec<Frame> {
        let mut codec = Codec::new().client_mode();
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(&mut buf).expect("valid frames") {
            frames.push(frame);
        }
        assert!(buf.is_empty(), "a partial frame was left over");
        frames
    }

    #[test]
    fn a_burst_shares_one_buffer_in_queue_order() {
        let (outbox, state) = Outbox::new(Weak::new());
        outbox.text("one");
        outbox.binary(Bytes::from_static(b"\x00\x01"));
        outbox.text_with(|t| t.push_str("three"));
        outbox.ping();
        assert!(state.borrow().frames.is_empty());
        let bytes = queued(&state);
        assert_eq!(outbox.unsent(), bytes.len());
        let frames = decode(&bytes);
        assert_eq!(frames.len(), 4);
        assert!(matches!(&frames[0], Frame::Text(b) if &b[..] == b"one"));
        assert!(matches!(&frames[1], Frame::Binary(b) if &b[..] == b"\x00\x01"));
        assert!(matches!(&frames[2], Frame::Text(b) if &b[..] == b"three"));
        assert!(matches!(&frames[3], Frame::Ping(_)));
    }

    #[test]
    fn partial_writes_across_full_buffers_keep_every_byte_in_order() {
        let (outbox, state) = Outbox::new(Weak::new());
        let texts: Vec<String> = (0..40).map(|i| format!("{i:04}").repeat(300)).collect();
        for text in &texts {
            outbox.text(text);
        }
        let expected = queued(&state);
        assert!(
            state.borrow().frames.len() >= 2,
            "a tail over {TAIL_MAX} bytes moves to the full buffers"
        );
        // Written in uneven pieces, as a socket takes them.
        let mut written = Vec::new();
        let mut piece = 1;
        while !outbox.is_drained() {
            let s = state.borrow();
            let next = s
                .frames
                .front()
                .map_or_else(|| s.tail.to_vec(), |f| f.to_vec());
            let n = piece.min(next.len());
            written.extend_from_slice(&next[..n]);
            drop(s);
            state.borrow_mut().written(n);
            assert_eq!(outbox.unsent(), expected.len() - written.len());
            piece = piece * 3 % 7001 + 1;
        }
        assert_eq!(written, expected);
        let frames = decode(&written);
        let got: Vec<&[u8]> = frames
            .iter()
            .map(|f| match f {
                Frame::Text(b) => &b[..],
                other => panic!("unexpected frame {other:?}"),
            })
            .collect();
        let want: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
        assert_eq!(got, want);
        // Nothing is held once everything is written.
        assert_eq!(state.borrow().tail.capacity(), 0);
        assert_eq!(outbox.stalled_for(), Duration::ZERO);
    }

    #[test]
    fn nothing_is_queued_after_close_or_a_failed_write() {
        let (outbox, state) = Outbox::new(Weak::new());
        outbox.text("before");
        outbox.close(None);
        let closed = queued(&state);
        outbox.text("after");
        outbox.ping();
        assert_eq!(queued(&state), closed);
        let frames = decode(&closed);
        assert!(matches!(frames.last(), Some(Frame::Close(None))));

        let (outbox, state) = Outbox::new(Weak::new());
        outbox.text("lost with the connection");
        state.borrow_mut().fail();
        outbox.text("after");
        assert!(outbox.is_drained());
        assert_eq!(outbox.unsent(), 0);
    }
}
