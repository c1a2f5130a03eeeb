//! One task per WebSocket connection: reads frames, writes queued frames, keeps the heartbeat.
//!
//! Everything a connection does happens in one loop waiting on its socket halves and one
//! wake-up (frames queued, close requested, heartbeat tick, shutdown), so there is no second
//! task and no timer per connection. Frames waiting for the socket are copied into one contiguous write buffer and
//! written with as few syscalls as the kernel allows; reading pauses while that buffer is over
//! its high mark, which is what bounds the memory of a client that sends but never reads.
//! While idle, a session holds neither a read nor a write buffer.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::outbox::{OutboxReceiver, WakeBatch};
use crate::engine::stats::Stats;
use crate::types::clock::now_us;
use crate::ws::close::{CloseCode, WsViolation};
use crate::ws::deflate::{self, Deflate};
use crate::ws::frame::{OpCode, encode_close, encode_into};
use crate::ws::reader::{Incoming, MessageReader};
use crate::ws::transport::{READ_CHUNK, Transport, read_some, reserve_for_read, write_all};

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Reading pauses while this much is waiting to be written.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// Empty buffers up to this capacity are kept between messages and released on the next
/// heartbeat tick; larger ones are released at once.
const KEEP_BUFFER: usize = 16 * 1024;
/// How much earlier than due a ping may go out: the heartbeat ticks once a second, and a ping
/// that waited for the next tick would leave the client too little time to answer.
const PING_EARLY: Duration = Duration::from_millis(500);
/// How long the server waits for the client's close frame after sending its own.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

/// Per-endpoint session settings, stored compactly: every connection carries a copy.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    max_message: u32,
    /// Milliseconds; 0 = never ping.
    ping_ms: u32,
    timeout_ms: u32,
    close_grace_ms: u32,
    /// permessage-deflate, when the connection negotiated it.
    deflate: Option<Deflate>,
}

/// Milliseconds in 32 bits, saturating at 49.7 days: these are durations (ping interval,
/// timeout, close grace), never clock readings, and the settings cap them at one day, 2 % of
/// the range. A longer duration given through the library would mean "practically never",
/// which the saturation keeps.
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl SessionConfig {
    /// Largest message accepted (larger closes with 1009); interval of server pings (`None`
    /// never pings: the echo endpoint); silence after which the connection is closed with
    /// 4000; time allowed to flush and close on shutdown or error.
    pub fn new(
        max_message: usize,
        ping_interval: Option<Duration>,
        timeout: Duration,
        close_grace: Duration,
    ) -> Self {
        Self {
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            ping_ms: ping_interval.map_or(0, millis),
            timeout_ms: millis(timeout),
            close_grace_ms: millis(close_grace),
            deflate: None,
        }
    }

    /// The same settings on a connection that negotiated permessage-deflate (`Some`): the
    /// session inflates compressed messages and compresses what it sends.
    pub fn with_deflate(mut self, deflate: Option<Deflate>) -> Self {
        self.deflate = deflate;
        self
    }

    fn max_message(&self) -> usize {
        self.max_message as usize
    }

    fn ping_interval(&self) -> Option<Duration> {
        (self.ping_ms > 0).then(|| Duration::from_millis(u64::from(self.ping_ms)))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_ms))
    }

    fn close_grace(&self) -> Duration {
        Duration::from_millis(u64::from(self.close_grace_ms))
    }
}

/// Frames a handler sends directly on its own connection (replies, welcome, errors).
#[derive(Debug)]
pub struct Replies<'a> {
    buf: &'a mut BytesMut,
    count: u64,
    /// Replies are compressed (one message at a time, on this worker thread's compressor)
    /// when the connection negotiated permessage-deflate.
    deflate: Option<Deflate>,
}

impl Replies<'_> {
    /// Queues a text frame.
    pub fn text(&mut self, text: &str) {
        deflate::encode_into(self.buf, true, text.as_bytes(), self.deflate);
        self.count += 1;
    }

    /// Queues a text frame from bytes already known to be UTF-8.
    pub fn frame_text(&mut self, text: &[u8]) {
        deflate::encode_into(self.buf, true, text, self.deflate);
        self.count += 1;
    }

    /// Queues a binary frame.
    pub fn binary(&mut self, data: &[u8]) {
        deflate::encode_into(self.buf, false, data, self.deflate);
        self.count += 1;
    }

    /// Queues an already-encoded frame.
    pub fn frame(&mut self, frame: &[u8]) {
        self.buf.extend_from_slice(frame);
        self.count += 1;
    }
}

/// What an endpoint does with a connection's messages.
pub trait Handler: Send {
    /// Called once before anything else, without waiting on anything: the welcome. What it
    /// queues is written to the socket before [`Handler::on_open`] runs, so a client learns
    /// who it is even while the broker stalls.
    fn on_welcome(&mut self, _out: &mut Replies<'_>) {}
    /// Called once after the welcome went out, before any message is read; may wait on the
    /// broker (joining a channel, a replay).
    fn on_open(&mut self, out: &mut Replies<'_>) -> impl Future<Output = ()> + Send;
    /// A complete, UTF-8 validated text message.
    fn on_text(&mut self, text: Bytes, out: &mut Replies<'_>) -> impl Future<Output = ()> + Send;
    /// A complete binary message.
    fn on_binary(&mut self, data: Bytes, out: &mut Replies<'_>) -> impl Future<Output = ()> + Send;
    /// Called when the messages of one read have been handed over, before the session
    /// yields its thread in a long read, and before it ends: a handler that gathers messages
    /// to act on them together (publishing a read's chat messages as one pipeline) finishes
    /// them here, so their replies go out with the read's. The default gathers nothing.
    fn on_read_end(&mut self, _out: &mut Replies<'_>) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
    /// Called when the outbox has drained and the hub reported gaps, so gap notices follow
    /// everything queued before them.
    fn on_gaps(&mut self, _out: &mut Replies<'_>) {}
    /// Called on the server's one-second tick (token expiry and the like).
    fn on_tick(&mut self, _out: &mut Replies<'_>) {}
    /// Called once when the connection ends, for whatever reason, before the close frame is
    /// written: drops what must not outlive the connection locally (its channel memberships),
    /// without waiting for anything.
    fn on_closing(&mut self) {}
    /// Called once after the close frame went out (and the close handshake ended or timed
    /// out): the cleanup that needs other parties (the broker). During a server shutdown it is
    /// cut short after the close grace period.
    fn on_close(&mut self, server_shutting_down: bool) -> impl Future<Output = ()> + Send;
}

/// What the main loop's wait returned (see `Session::poll_event`).
enum Event {
    /// The outbox woke the session: frames, a close request, a tick or gaps.
    Woken,
    /// The socket took bytes of the write buffer.
    Written(std::io::Result<usize>),
    /// TLS flushed the records it held.
    Flushed(std::io::Result<()>),
    /// The socket is readable.
    Ready(std::io::Result<()>),
}

/// Why the main loop ended.
#[derive(Debug)]
enum End {
    /// The client sent a close frame (with this code, if any).
    ClientClosed(Option<u16>),
    /// The server decided to close.
    Server(CloseCode),
    /// The client broke the protocol.
    Violation(WsViolation),
    /// The socket is gone (EOF without close, reset, write error).
    Gone,
}

/// Everything a session needs besides its socket.
pub struct SessionParts<H> {
    /// Frames fanned out to this client, and close and gap signals.
    pub outbox: OutboxReceiver,
    /// The endpoint's behaviour.
    pub handler: H,
    /// Endpoint settings.
    pub config: SessionConfig,
    /// Server-wide shutdown.
    pub shutdown: CancellationToken,
    /// Server counters.
    pub stats: Arc<Stats>,
    /// What must live exactly as long as the session (registry entry, connection permit,
    /// task count).
    pub guards: Guards,
}

/// Held by a session for its whole life; each releases something when the session ends.
#[derive(Debug)]
pub struct Guards {
    /// The session's entry in the registry (heartbeat, shutdown, disconnect).
    pub registration: crate::engine::sessions::Registration,
    /// Its slot under `RUSTY_SOCKS_MAX_CONN`.
    pub permit: crate::engine::admission::ConnectionPermit,
    /// Its count in `active_tasks`.
    pub task: crate::engine::stats::TaskGuard,
}

impl<H: Handler> SessionParts<H> {
    /// The parts of a session of `handler`, boxed (see `ws::start`).
    pub fn new(
        outbox: OutboxReceiver,
        handler: H,
        config: SessionConfig,
        shutdown: CancellationToken,
        stats: Arc<Stats>,
        guards: Guards,
    ) -> Box<Self> {
        Box::new(Self {
            outbox,
            handler,
            config,
            shutdown,
            stats,
            guards,
        })
    }

    /// Puts the session together with its socket's halves.
    #[expect(
        clippy::boxed_local,
        reason = "the parts travel boxed so the long-lived caller's state stays small"
    )]
    pub fn into_session<T: Transport>(self: Box<Self>, io: T) -> Session<T, H> {
        let parts = *self;
        let parser =
            MessageReader::with_deflate(parts.config.max_message(), parts.config.deflate.is_some());
        Session {
            io,
            outbox: parts.outbox,
            handler: parts.handler,
            config: parts.config,
            shutdown: parts.shutdown,
            stats: parts.stats,
            batch_since: 0,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            parser,
            _guards: parts.guards,
        }
    }
}

/// Everything one session task owns.
pub struct Session<T, H> {
    io: T,
    outbox: OutboxReceiver,
    handler: H,
    config: SessionConfig,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    /// When the oldest frame in the write buffer was queued (0: none), for the
    /// queue-to-socket latency histogram.
    batch_since: u64,
    /// Bytes read and not yet parsed; no allocation while idle.
    rbuf: BytesMut,
    /// Frames waiting for the socket; no allocation while idle.
    wbuf: BytesMut,
    /// The state that spans frames (a fragmented message).
    parser: MessageReader,
    _guards: Guards,
}

impl<T, H> Session<T, H>
where
    T: Transport,
    H: Handler,
{
    /// Runs the connection to its end, including the close handshake; `leftover` holds bytes
    /// the client sent right behind its handshake request.
    ///
    /// A plain fn returning an `async move` block rather than an `async fn`: an async fn keeps
    /// its arguments twice in its state (as captured and as locals), which for `self` would
    /// cost every connection a second copy of the session for its whole life.
    pub fn run(mut self, leftover: Bytes) -> impl Future<Output = ()> + 'static
    where
        T: 'static,
        H: 'static,
    {
        self.rbuf = BytesMut::from(&leftover[..]);
        drop(leftover);
        async move {
            // Boxed: the welcome's write deadline and the handler's replies exist only while
            // the connection opens; inline they would enlarge every connection's task for its
            // whole life (the task is as large as the largest state it may ever be in).
            Box::pin(self.open()).await;

            // A bug must not skip `on_close`: that would leave the client in its channels and in
            // presence forever. A panic ends the connection with 1011 instead.
            let end = AssertUnwindSafe(self.main_loop())
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!("session panicked; closing with 1011");
                    End::Server(CloseCode::InternalError)
                });
            let shutting_down = self.shutdown.is_cancelled();
            self.handler.on_closing();
            tracing::debug!(?end, "session ending");
            // The close frame goes first: the broker's part of leaving (unsubscribe, presence,
            // leave notices) may be slow, or stuck while the broker is unreachable, and must
            // never hold back a client's close frame.
            // Boxed: the closing state is only needed once, and would otherwise enlarge every
            // connection's task for its whole life.
            Box::pin(self.finish(end)).await;
            // Boxed too: its timer exists only while closing.
            Box::pin(self.clean_up(shutting_down)).await;
        }
    }

    /// The welcome, written before `on_open` may wait on the broker, then `on_open`.
    async fn open(&mut self) {
        let mut replies = Replies {
            buf: &mut self.wbuf,
            count: 0,
            deflate: self.config.deflate,
        };
        self.handler.on_welcome(&mut replies);
        self.stats.add_out(replies.count);
        self.flush_welcome().await;
        let mut replies = Replies {
            buf: &mut self.wbuf,
            count: 0,
            deflate: self.config.deflate,
        };
        self.handler.on_open(&mut replies).await;
        self.stats.add_out(replies.count);
    }

    /// The handler's cleanup after the close frame; on shutdown it is best effort, cut short
    /// after the close grace period, so a broker that does not answer cannot hold the exit.
    async fn clean_up(&mut self, shutting_down: bool) {
        let grace = self.config.close_grace();
        let cleanup = self.handler.on_close(shutting_down);
        if !shutting_down {
            cleanup.await;
        } else if timeout(grace, cleanup).await.is_err() {
            tracing::debug!("broker cleanup cut short by shutdown");
        }
    }

    /// Writes the welcome before `on_open` may wait on the broker. Bounded by the close grace
    /// (a fresh socket takes a welcome at once; a client that reads nothing must not hold the
    /// session here): whatever is left is written by the main loop, and a broken socket is
    /// noticed there too.
    async fn flush_welcome(&mut self) {
        let io = &self.io;
        let stats = &self.stats;
        let wbuf = &mut self.wbuf;
        let write = async {
            while !wbuf.is_empty() {
                match std::future::poll_fn(|cx| io.poll_write(cx, wbuf)).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        wbuf.advance(n);
                        stats.add_bytes_out(n);
                    }
                }
            }
        };
        let _ = timeout(self.config.close_grace(), write).await;
    }

    /// The connection's life between open and close. A plain fn returning an `async move`
    /// block, like [`Session::run`]: as an `async fn` its reference would be kept twice in the
    /// state an idle connection waits in. The buffers and the parser are the session's own
    /// fields, so that state holds one reference, not four.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep its reference twice in every idle connection's task"
    )]
    fn main_loop(&mut self) -> impl Future<Output = End> + '_ {
        async move {
            // Microsecond stamps ([`now_us`]) rather than `Instant`s: half the size, in every
            // connection's state.
            let mut last_seen = now_us();
            let mut next_ping = self
                .config
                .ping_interval()
                .map_or(0, |p| last_seen + micros(p));
            if self.shutdown.is_cancelled() {
                return End::Server(CloseCode::GoingAway);
            }

            // Bytes the client pipelined right behind its handshake are processed first.
            let mut pending_input = !self.rbuf.is_empty();
            // Which source is polled first; turns rotate (see `poll_event`).
            let mut turn: u8 = 0;
            loop {
                // A loop, not an `if`: the opportunistic write below may empty the write buffer,
                // and then nothing else would bring us back to the input still pending.
                while pending_input && self.wbuf.len() < WRITE_HIGH_WATER {
                    let frames_before = self.parser.frames();
                    // Boxed: this state exists only while input is handled, not while idle.
                    let (end, more) = Box::pin(self.on_readable()).await;
                    // Only whole frames prove the client alive; a trickle of bytes does not.
                    if self.parser.frames() != frames_before {
                        last_seen = now_us();
                    }
                    if let Some(end) = end {
                        return end;
                    }
                    pending_input = more;
                    if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_BUFFER {
                        self.rbuf = BytesMut::new();
                    }
                    self.take_from_outbox();
                    // Answer right away when the socket takes it, without another turn.
                    if !self.wbuf.is_empty() {
                        let io = &self.io;
                        let wbuf = &self.wbuf;
                        match std::future::poll_fn(|cx| io.poll_write(cx, wbuf)).now_or_never() {
                            Some(Ok(0) | Err(_)) => return End::Gone,
                            Some(Ok(n)) => self.wrote(n),
                            None => {}
                        }
                    }
                }
                let can_take = self.wbuf.len() < WRITE_HIGH_WATER;
                let read = can_take && !pending_input;
                turn = turn.wrapping_add(1);
                let this = &mut *self;
                let event = std::future::poll_fn(move |cx| this.poll_event(cx, turn, read)).await;
                match event {
                    Event::Woken => {
                        if let Some(code) = self.outbox.close_requested() {
                            return End::Server(code);
                        }
                        if self.shutdown.is_cancelled() {
                            return End::Server(CloseCode::GoingAway);
                        }
                        if self.outbox.take_tick() {
                            // Small buffers stay while a connection is busy (no allocation per
                            // message); an idle one gives them back within a tick.
                            if self.rbuf.is_empty() && !pending_input {
                                self.rbuf = BytesMut::new();
                            }
                            if self.wbuf.is_empty() {
                                self.wbuf = BytesMut::new();
                            }
                            self.outbox.release_idle();
                            let now = now_us();
                            if now.saturating_sub(last_seen) >= micros(self.config.timeout()) {
                                return End::Server(CloseCode::HeartbeatTimeout);
                            }
                            let mut replies = Replies {
                                buf: &mut self.wbuf,
                                count: 0,
                                deflate: self.config.deflate,
                            };
                            self.handler.on_tick(&mut replies);
                            self.stats.add_out(replies.count);
                            // Ticks come every second: ping when the next tick would be late.
                            if let Some(every) = self.config.ping_interval()
                                && now + micros(PING_EARLY) >= next_ping
                            {
                                encode_into(&mut self.wbuf, OpCode::Ping, b"");
                                next_ping = now + micros(every);
                            }
                        }
                        if can_take {
                            self.take_from_outbox();
                        }
                    }
                    Event::Written(Ok(0) | Err(_))
                    | Event::Flushed(Err(_))
                    | Event::Ready(Err(_)) => {
                        return End::Gone;
                    }
                    Event::Written(Ok(n)) => self.wrote(n),
                    Event::Flushed(Ok(())) => {}
                    Event::Ready(Ok(())) => {
                        let read = if self.rbuf.capacity() == 0 {
                            // No buffer yet (idle): read onto the stack first, so a spurious
                            // readiness never allocates one, and a small message gets a small one.
                            let mut chunk = [0u8; READ_CHUNK];
                            self.io
                                .try_read(&mut chunk)
                                .inspect(|n| self.rbuf.extend_from_slice(&chunk[..*n]))
                        } else {
                            // Room in proportion to what arrived, never to a declared length.
                            reserve_for_read(&mut self.rbuf);
                            self.io.try_read_buf(&mut self.rbuf)
                        };
                        match read {
                            Ok(0) => return End::Gone,
                            Ok(n) => {
                                self.stats.add_bytes_in(n);
                                pending_input = true;
                            }
                            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => return End::Gone,
                        }
                    }
                }
            }
        }
    }

    /// Waits for whichever comes first: the outbox's wake-up (frames, close, tick), room in
    /// the socket for the write buffer, TLS's flush of records it held back, or input (when
    /// `read`). In place of `tokio::select!`, whose state (one future per branch) every idle
    /// connection would keep: this keeps one reference. The source polled first rotates with
    /// `turn`, so under load every ready source gets its turn: a busy outbox cannot starve
    /// reading (and with it the client's pongs), nor busy input the outbox.
    fn poll_event(&mut self, cx: &mut Context<'_>, turn: u8, read: bool) -> Poll<Event> {
        for source in 0..4u8 {
            let polled = match turn.wrapping_add(source) % 4 {
                0 => self.outbox.poll_woken(cx).map(|()| Event::Woken),
                1 if !self.wbuf.is_empty() => {
                    self.io.poll_write(cx, &self.wbuf).map(Event::Written)
                }
                // TLS may hold the last records it took when the socket was full; nothing else
                // would send them until the next frame (or ping) comes along.
                2 if self.wbuf.is_empty() && self.io.has_unflushed() => {
                    self.io.poll_flush(cx).map(Event::Flushed)
                }
                3 if read => self.io.poll_read_ready(cx).map(Event::Ready),
                _ => Poll::Pending,
            };
            if polled.is_ready() {
                return polled;
            }
        }
        Poll::Pending
    }

    /// Accounts for `n` written bytes; an emptied buffer is released, and queued frames that
    /// waited for room move in (pushes only wake the session when its queue was empty).
    fn wrote(&mut self, n: usize) {
        self.wbuf.advance(n);
        self.stats.add_bytes_out(n);
        if self.wbuf.is_empty() && self.batch_since != 0 {
            self.stats.observe_write_delay(self.batch_since);
            self.batch_since = 0;
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > KEEP_BUFFER {
            self.wbuf = BytesMut::new();
        }
        if self.wbuf.len() < WRITE_HIGH_WATER {
            self.take_from_outbox();
        }
    }

    /// Moves queued frames into the write buffer up to its high mark, then reports gaps once
    /// the outbox is empty, so a gap notice follows everything queued before it.
    fn take_from_outbox(&mut self) {
        let (taken, since) =
            self.outbox
                .drain_into(&mut self.wbuf, WRITE_HIGH_WATER, self.config.deflate);
        self.stats.add_out(taken);
        if taken > 0 && self.batch_since == 0 {
            self.batch_since = since;
        }
        if self.outbox.has_gaps() && self.outbox.is_empty() {
            let mut replies = Replies {
                buf: &mut self.wbuf,
                count: 0,
                deflate: self.config.deflate,
            };
            self.handler.on_gaps(&mut replies);
            self.stats.add_out(replies.count);
        }
    }

    /// Handles the complete messages in `rbuf`. Returns `Some` to end the connection, and
    /// whether it stopped early because the write buffer reached its high mark (the rest stays
    /// in `rbuf` until the client has read some): replies can be large (a `history`), so
    /// answering everything a client pipelined before writing would let it grow the server's
    /// memory at will.
    async fn on_readable(&mut self) -> (Option<End>, bool) {
        let rbuf = &mut self.rbuf;
        let parser = &mut self.parser;
        let mut replies = Replies {
            buf: &mut self.wbuf,
            count: 0,
            deflate: self.config.deflate,
        };
        let mut received: u64 = 0;
        let mut queued = 0;
        // The subscribers these messages reach are woken once per batch, not per message
        // (released when this returns, before a yield, and whenever a handler waits).
        let mut wakes = WakeBatch::default();
        let outcome = loop {
            if replies.buf.len() >= WRITE_HIGH_WATER {
                break (None, true);
            }
            let message = match parser.next(rbuf) {
                Ok(None) => break (None, false),
                Ok(Some(message)) => message,
                Err(violation) => {
                    tracing::debug!(%violation, "closing on client violation");
                    break (Some(End::Violation(violation)), false);
                }
            };
            if matches!(message, Incoming::Text(_) | Incoming::Binary(_)) {
                // Everything queued for this client before its message goes out before the
                // reply, so a reply (say, a recovery replay) never overtakes older pushes.
                let (taken, since) =
                    self.outbox
                        .drain_into(replies.buf, usize::MAX, self.config.deflate);
                queued += taken;
                if taken > 0 && self.batch_since == 0 {
                    self.batch_since = since;
                }
                received += 1;
            }
            match message {
                Incoming::Text(text) => wakes.hold(self.handler.on_text(text, &mut replies)).await,
                Incoming::Binary(data) => {
                    wakes.hold(self.handler.on_binary(data, &mut replies)).await;
                }
                Incoming::Ping(payload) => {
                    encode_into(replies.buf, OpCode::Pong, &payload);
                    continue;
                }
                Incoming::Pong => continue,
                Incoming::Close(code) => break (Some(End::ClientClosed(code)), false),
            }
            if received > 0 && received.is_multiple_of(MESSAGES_PER_YIELD) {
                wakes.hold(self.handler.on_read_end(&mut replies)).await;
                wakes.release();
            }
            yield_every(received).await;
        };
        // Also when the connection ends here: what the client sent before its close is
        // handled, as it would have been one message at a time.
        wakes.hold(self.handler.on_read_end(&mut replies)).await;
        wakes.release();
        self.stats.add_in(received);
        self.stats.add_out(replies.count + queued);
        outcome
    }

    /// Sends the closing frames, flushes within the grace period and waits briefly for the
    /// client's close reply, so the server ends the TCP connection only after the handshake.
    async fn finish(&mut self, end: End) {
        let rbuf = &mut self.rbuf;
        let wbuf = &mut self.wbuf;
        let parser = &mut self.parser;
        let code = match end {
            End::Gone => return,
            End::ClientClosed(code) => {
                // Echo the client's code, as RFC 6455 §5.5.1 asks; no reply needed after.
                encode_close(wbuf, code.unwrap_or(1000), "");
                let _ = timeout(self.config.close_grace(), write_all(&self.io, wbuf)).await;
                return;
            }
            End::Violation(v) => v.close_code(),
            End::Server(code) => code,
        };
        match code {
            CloseCode::GoingAway => {
                // Shutdown: deliver what was already queued for this client first.
                let (n, _) = self
                    .outbox
                    .drain_into(wbuf, usize::MAX, self.config.deflate);
                self.stats.add_out(n);
            }
            CloseCode::SlowConsumer => self.stats.slow_consumer_closed(),
            _ => {}
        }
        encode_close(wbuf, code.code(), code.reason());
        let violation = matches!(end, End::Violation(_));
        let closing = async {
            write_all(&self.io, wbuf).await?;
            if violation {
                // Failing the connection: the stream cannot be trusted to parse any more, so
                // end TCP first and only drain (never parse) what is still arriving.
                std::future::poll_fn(|cx| self.io.poll_shutdown(cx)).await?;
                drain(&self.io, rbuf).await;
                Ok(())
            } else {
                wait_for_close(&self.io, rbuf, parser).await;
                std::future::poll_fn(|cx| self.io.poll_shutdown(cx)).await
            }
        };
        let _ = timeout(self.config.close_grace(), closing).await;
    }
}

/// Messages handled between two yields to the scheduler.
const MESSAGES_PER_YIELD: u64 = 16;

/// Each message may fan out to many outboxes. Yielding every few messages makes a client that
/// pipelines thousands of them share its worker thread, so the sessions it feeds get to drain
/// their outboxes meanwhile instead of overflowing while this task runs uninterrupted.
async fn yield_every(handled: u64) {
    if handled > 0 && handled.is_multiple_of(MESSAGES_PER_YIELD) {
        tokio::task::yield_now().await;
    }
}

/// Reads until the client's close frame, EOF, an error, or [`CLOSE_REPLY_WAIT`].
async fn wait_for_close<T: Transport>(io: &T, rbuf: &mut BytesMut, parser: &mut MessageReader) {
    let wait = async {
        loop {
            loop {
                match parser.next(rbuf) {
                    Ok(Some(Incoming::Close(_))) | Err(_) => return,
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                }
            }
            match read_some(io, rbuf, READ_CHUNK).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = timeout(CLOSE_REPLY_WAIT, wait).await;
}

/// Discards input until EOF or [`CLOSE_REPLY_WAIT`]: closing a socket with unread input makes
/// the kernel send a reset, which can destroy the close frame before the client reads it.
async fn drain<T: Transport>(io: &T, rbuf: &mut BytesMut) {
    let wait = async {
        loop {
            rbuf.clear();
            match read_some(io, rbuf, READ_CHUNK).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = timeout(CLOSE_REPLY_WAIT, wait).await;
}

#[cfg(test)]
mod tests;
