//! One task per WebSocket connection: reads frames, writes queued frames, keeps the heartbeat.
//!
//! Everything a connection does happens in one loop waiting on its socket halves and one
//! wake-up (frames queued, close requested, heartbeat tick, shutdown), so there is no second
//! task and no timer per connection. Frames waiting for the socket stay shared until written
//! (`output`), with as few syscalls as the kernel allows; reading pauses while what waits is over
//! its high mark, which is what bounds the memory of a client that sends but never reads.
//! While idle, a session holds neither a read nor a write buffer.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::time::timeout;

use super::outbox::{OutboxReceiver, WakeBatch};
use crate::engine::stats::Stats;
use crate::types::clock::{now_us, stamp_us};
use crate::ws::close::CloseCode;
use crate::ws::deflate::{self, Deflate};
use crate::ws::frame::{OpCode, encode_into};
use crate::ws::reader::Incoming;
use crate::ws::transport::{READ_CHUNK, Transport, reserve_for_read};
use busy::{Busy, busy, pending_write, replies_in};

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

/// Per-endpoint session settings, stored compactly: every connection carries a copy.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    max_message: u32,
    /// Milliseconds; 0 = never ping.
    ping_ms: u32,
    timeout_ms: u32,
    close_grace_ms: u32,
    /// Milliseconds; 0 = write at once (see [`SessionConfig::with_write_delay`], in
    /// `session/delay.rs` with the rest of the write delay).
    write_delay_ms: u8,
    /// Milliseconds, while the server is saturated; 0 = never (see
    /// [`SessionConfig::with_busy_write_delay`]).
    busy_write_delay_ms: u8,
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
            write_delay_ms: 0,
            busy_write_delay_ms: 0,
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
    /// The write delay of frames held back for more has passed (`Session::hold_for_more`).
    Due,
    /// The socket took bytes of what waits (frames, then the write buffer).
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
    /// The client broke the protocol; closed with this code. The violation itself is logged
    /// where it is found: kept here it would triple this enum, which sits in every
    /// connection's task.
    Violation(CloseCode),
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
    /// What must live exactly as long as the session (registry entry, connection permit,
    /// task count); the session also reads the server's counters and its shutdown through them.
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

impl Guards {
    /// The server's counters.
    fn stats(&self) -> &Stats {
        self.task.stats()
    }
}

impl<H: Handler> SessionParts<H> {
    /// The parts of a session of `handler`, boxed (see `ws::start`).
    pub fn new(
        outbox: OutboxReceiver,
        handler: H,
        config: SessionConfig,
        guards: Guards,
    ) -> Box<Self> {
        Box::new(Self {
            outbox,
            handler,
            config,
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
        Session {
            io,
            outbox: parts.outbox,
            handler: parts.handler,
            config: parts.config,
            busy: None,
            guards: parts.guards,
        }
    }
}

/// Everything one session task owns.
pub struct Session<T, H> {
    io: T,
    outbox: OutboxReceiver,
    handler: H,
    config: SessionConfig,
    /// Buffers and parser, only while there is something in them (see [`Busy`]).
    busy: Option<Box<Busy>>,
    guards: Guards,
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
        if !leftover.is_empty() {
            busy(&mut self.busy, &self.config)
                .rbuf
                .extend_from_slice(&leftover);
        }
        drop(leftover);
        async move {
            // Boxed: the welcome's write deadline and the handler's replies exist only while
            // the connection opens; inline they would enlarge every connection's task for its
            // whole life (the task is as large as the largest state it may ever be in).
            Box::pin(self.open()).await;
            // The welcome is usually written at once: give its buffers back now rather than
            // on the first heartbeat tick. Held until then, a wave of new connections keeps one
            // `Busy` per connection alive for up to a second, interleaved in the allocator's
            // pages with the blocks the connections keep, and those pages stay resident after
            // the `Busy`s are freed (measured: ~110 bytes per connection after a wave of 10,000).
            self.release_buffers(false);

            // A bug must not skip `on_close`: that would leave the client in its channels and in
            // presence forever. A panic ends the connection with 1011 instead.
            let end = AssertUnwindSafe(self.main_loop())
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!("session panicked; closing with 1011");
                    End::Server(CloseCode::InternalError)
                });
            let shutting_down = self.guards.registration.closing();
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
        let mut replies = replies_in(&mut self.busy, &self.config);
        self.handler.on_welcome(&mut replies);
        self.guards.stats().add_out(replies.count);
        self.flush_welcome().await;
        let mut replies = replies_in(&mut self.busy, &self.config);
        self.handler.on_open(&mut replies).await;
        self.guards.stats().add_out(replies.count);
    }

    /// Writes the welcome before `on_open` may wait on the broker. Bounded by the close grace
    /// (a fresh socket takes a welcome at once; a client that reads nothing must not hold the
    /// session here): whatever is left is written by the main loop, and a broken socket is
    /// noticed there too.
    async fn flush_welcome(&mut self) {
        let io = &self.io;
        let stats = self.guards.stats();
        let wbuf = &mut busy(&mut self.busy, &self.config).wbuf;
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
    /// (boxed) fields, so that state holds one reference, not four.
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
            if self.guards.registration.closing() {
                return End::Server(CloseCode::GoingAway);
            }

            // Bytes the client pipelined right behind its handshake are processed first.
            let mut pending_input = self.busy.as_ref().is_some_and(|b| !b.rbuf.is_empty());
            // Which source is polled first; turns rotate (see `poll_event`).
            let mut turn: u8 = 0;
            loop {
                // A loop, not an `if`: the opportunistic write below may empty the write buffer,
                // and then nothing else would bring us back to the input still pending.
                while pending_input && self.write_waiting() < WRITE_HIGH_WATER {
                    // Boxed: this state exists only while input is handled, not while idle.
                    let (end, more, alive) = Box::pin(self.on_readable()).await;
                    if alive {
                        last_seen = now_us();
                    }
                    let busy = busy(&mut self.busy, &self.config);
                    if let Some(end) = end {
                        return end;
                    }
                    pending_input = more;
                    if busy.rbuf.is_empty() && busy.rbuf.capacity() > KEEP_BUFFER {
                        busy.rbuf = BytesMut::new();
                    }
                    self.take_from_outbox();
                    // Answer right away when the socket takes it, without another turn.
                    if let Some(busy) = pending_write(&self.busy) {
                        let (io, deflate) = (&self.io, self.config.deflate);
                        let write = std::future::poll_fn(|cx| {
                            output::poll_write(io, cx, &busy.frames, &busy.wbuf, deflate)
                        });
                        match write.now_or_never() {
                            Some(Ok(0) | Err(_)) => return End::Gone,
                            Some(Ok(n)) => self.wrote(n),
                            None => {}
                        }
                    }
                }
                let read = self.write_waiting() < WRITE_HIGH_WATER && !pending_input;
                turn = turn.wrapping_add(1);
                let this = &mut *self;
                let event = std::future::poll_fn(move |cx| this.poll_event(cx, turn, read)).await;
                match event {
                    Event::Woken => {
                        if let Some(code) = self.outbox.close_requested() {
                            return End::Server(code);
                        }
                        if self.guards.registration.closing() {
                            return End::Server(CloseCode::GoingAway);
                        }
                        if self.outbox.take_tick() {
                            self.release_buffers(pending_input);
                            self.outbox.release_idle();
                            let now = now_us();
                            if now.saturating_sub(last_seen) >= micros(self.config.timeout()) {
                                return End::Server(CloseCode::HeartbeatTimeout);
                            }
                            self.on_tick(now, &mut next_ping);
                        }
                        // Not while the write buffer is at its high mark (a tick's ping may
                        // have taken it there), nor while the write delay holds them back.
                        if self.write_waiting() < WRITE_HIGH_WATER && !self.hold_for_more() {
                            self.take_from_outbox();
                        }
                    }
                    Event::Due => {
                        if self.write_waiting() < WRITE_HIGH_WATER {
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
                    Event::Ready(Ok(())) => match self.read() {
                        Ok(0) => return End::Gone,
                        Ok(_) => pending_input = true,
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return End::Gone,
                    },
                }
            }
        }
    }

    /// Bytes waiting for the socket.
    fn write_waiting(&self) -> usize {
        pending_write(&self.busy).map_or(0, |busy| busy.wbuf.len() + busy.frames.len())
    }

    /// On the heartbeat tick: small buffers stay while a connection is busy (no allocation
    /// per message); an idle one gives them back within a tick, and with them its [`Busy`]
    /// state once nothing is left in it.
    fn release_buffers(&mut self, pending_input: bool) {
        let delay = self.write_delay_us();
        let Some(busy) = self.busy.as_deref_mut() else {
            return;
        };
        if busy.rbuf.is_empty() && !pending_input {
            busy.rbuf = BytesMut::new();
        }
        if busy.wbuf.is_empty() {
            busy.wbuf = BytesMut::new();
        }
        busy.frames.release();
        // Kept while the write delay still counts from its last write.
        let recent = delay::wrote_recently(busy, delay);
        if !pending_input && busy.is_idle() && !recent {
            self.busy = None;
        }
    }

    /// The handler's tick, and a ping when the next tick would be late for it.
    /// Written to a buffer of its own first, which allocates nothing while nothing is
    /// written: an idle connection gets no [`Busy`] state for a tick that sends nothing.
    fn on_tick(&mut self, now: u64, next_ping: &mut u64) {
        let mut out = BytesMut::new();
        let mut replies = Replies {
            buf: &mut out,
            count: 0,
            deflate: self.config.deflate,
        };
        self.handler.on_tick(&mut replies);
        self.guards.stats().add_out(replies.count);
        // Ticks come every second: ping when the next tick would be late.
        if let Some(every) = self.config.ping_interval()
            && now + micros(PING_EARLY) >= *next_ping
        {
            encode_into(&mut out, OpCode::Ping, b"");
            *next_ping = now + micros(every);
        }
        if !out.is_empty() {
            let wbuf = &mut busy(&mut self.busy, &self.config).wbuf;
            if wbuf.is_empty() {
                *wbuf = out;
            } else {
                wbuf.extend_from_slice(&out);
            }
        }
    }

    /// Reads what the socket holds into the read buffer. With no buffer yet (idle) it reads
    /// onto the stack first, so a spurious readiness never allocates one, and a small
    /// message gets a small one.
    fn read(&mut self) -> std::io::Result<usize> {
        let read = match self.busy.as_deref_mut() {
            Some(busy) if busy.rbuf.capacity() > 0 => {
                // Room in proportion to what arrived, never to a declared length.
                reserve_for_read(&mut busy.rbuf);
                self.io.try_read_buf(&mut busy.rbuf)
            }
            _ => {
                let mut chunk = [0u8; READ_CHUNK];
                let n = self.io.try_read(&mut chunk)?;
                if n > 0 {
                    busy(&mut self.busy, &self.config)
                        .rbuf
                        .extend_from_slice(&chunk[..n]);
                }
                Ok(n)
            }
        };
        if let Ok(n) = read {
            self.guards.stats().add_bytes_in(n);
        }
        read
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
                0 => {
                    let due = self
                        .busy
                        .as_deref_mut()
                        .is_some_and(|busy| busy.held && delay::poll_due(busy, cx));
                    if due {
                        Poll::Ready(Event::Due)
                    } else {
                        self.outbox.poll_woken(cx).map(|()| Event::Woken)
                    }
                }
                1 => match pending_write(&self.busy) {
                    Some(busy) => output::poll_write(
                        &self.io,
                        cx,
                        &busy.frames,
                        &busy.wbuf,
                        self.config.deflate,
                    )
                    .map(Event::Written),
                    None => Poll::Pending,
                },
                // TLS may hold the last records it took when the socket was full; nothing else
                // would send them until the next frame (or ping) comes along.
                2 if pending_write(&self.busy).is_none() && self.io.has_unflushed() => {
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

    /// The write delay in effect now (see [`SessionConfig::write_delay_us`]).
    fn write_delay_us(&self) -> u64 {
        let stats = self.guards.stats();
        self.config.write_delay_us(|| stats.load().saturated())
    }

    /// Whether the frames the outbox woke the session for wait for the write delay.
    fn hold_for_more(&mut self) -> bool {
        let (delay, empty) = (self.write_delay_us(), self.outbox.is_empty());
        delay::hold_for_more(self.busy.as_deref_mut(), delay, empty)
    }

    /// Accounts for `n` written bytes; an emptied buffer is released, and queued frames that
    /// waited for room move in (pushes only wake the session when its queue was empty).
    fn wrote(&mut self, n: usize) {
        let stats = self.guards.stats();
        let busy = busy(&mut self.busy, &self.config);
        if self.config.delays_writes() {
            busy.last_write = stamp_us();
        }
        output::advance(&mut busy.frames, &mut busy.wbuf, n, self.config.deflate);
        stats.add_bytes_out(n);
        let nothing_waits = busy.wbuf.is_empty() && busy.frames.is_empty();
        if nothing_waits && busy.batch_since != 0 {
            stats.observe_write_delay(busy.batch_since);
            busy.batch_since = 0;
        }
        if busy.wbuf.is_empty() && busy.wbuf.capacity() > KEEP_BUFFER {
            busy.wbuf = BytesMut::new();
        }
        if busy.wbuf.len() + busy.frames.len() < WRITE_HIGH_WATER {
            self.take_from_outbox();
        }
    }

    /// Takes queued frames up to the high mark (uncopied while the write buffer is empty, else
    /// copied in behind it; see `output`), then reports gaps once
    /// the outbox is empty, so a gap notice follows everything queued before it. Makes no
    /// [`Busy`] state for an empty outbox.
    fn take_from_outbox(&mut self) {
        if self.outbox.is_empty() && !self.outbox.has_gaps() {
            return;
        }
        let stats = self.guards.stats();
        let busy = busy(&mut self.busy, &self.config);
        let deflate = self.config.deflate;
        // Uncopied while nothing of the session's own waits behind them (see `output`).
        let (taken, since) = if busy.wbuf.is_empty() && self.io.writes_vectored() {
            busy.frames.take(&self.outbox, WRITE_HIGH_WATER, deflate)
        } else {
            let room = WRITE_HIGH_WATER.saturating_sub(busy.frames.len());
            self.outbox.drain_into(&mut busy.wbuf, room, deflate)
        };
        stats.add_out(taken);
        if taken > 0 && busy.batch_since == 0 {
            busy.batch_since = since;
        }
        if self.outbox.has_gaps() && self.outbox.is_empty() {
            let mut replies = Replies {
                buf: &mut busy.wbuf,
                count: 0,
                deflate: self.config.deflate,
            };
            self.handler.on_gaps(&mut replies);
            stats.add_out(replies.count);
        }
    }

    /// Handles the complete messages in the read buffer. Returns `Some` to end the connection;
    /// whether it stopped early because the write buffer reached its high mark (the rest
    /// stays in the read buffer until the client has read some): replies can be large (a
    /// `history`), so answering everything a client pipelined before writing would let it
    /// grow the server's memory at will; and whether a whole frame arrived (only whole frames
    /// prove the client alive, a trickle of bytes does not).
    async fn on_readable(&mut self) -> (Option<End>, bool, bool) {
        let stats = self.guards.stats();
        let Busy {
            rbuf,
            wbuf,
            parser,
            batch_since,
            frames,
            ..
        } = busy(&mut self.busy, &self.config);
        let frames_before = parser.frames();
        let mut replies = Replies {
            buf: wbuf,
            count: 0,
            deflate: self.config.deflate,
        };
        let mut received: u64 = 0;
        let mut queued = 0;
        // The subscribers these messages reach are woken once per batch, not per message
        // (released when this returns, before a yield, and whenever a handler waits).
        let mut wakes = WakeBatch::default();
        let outcome = loop {
            if replies.buf.len() + frames.len() >= WRITE_HIGH_WATER {
                break (None, true);
            }
            let message = match parser.next(rbuf) {
                Ok(None) => break (None, false),
                Ok(Some(message)) => message,
                Err(violation) => {
                    tracing::debug!(%violation, "closing on client violation");
                    break (Some(End::Violation(violation.close_code())), false);
                }
            };
            if matches!(message, Incoming::Text(_) | Incoming::Binary(_)) {
                // Everything queued for this client before its message goes out before the
                // reply, so a reply (say, a recovery replay) never overtakes older pushes.
                let (taken, since) =
                    self.outbox
                        .drain_into(replies.buf, usize::MAX, self.config.deflate);
                queued += taken;
                if taken > 0 && *batch_since == 0 {
                    *batch_since = since;
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
        stats.add_in(received);
        stats.add_out(replies.count + queued);
        (outcome.0, outcome.1, parser.frames() != frames_before)
    }
}

/// Messages handled between two yields to the scheduler. Also the most a read's legacy chat
/// messages (or v1 publishes) are published together as one pipeline, and so how many
/// publications a subscriber's wake carries from a flooding publisher. 64 rather than 16 first
/// (issue 19, docs/BENCHMARKS.md "Issue 19 on a quiet machine, 2026-12-03"), then 256 once a
/// batch went to each subscriber as runs of frames (docs/BENCHMARKS.md, "Issue 19: a batch
/// laid end to end once"): through Redis or NATS, where each pipeline costs a broker round
/// trip and arrives as one batch, 10-30 % more deliveries per CPU-second; the memory broker
/// the same. A slice of 256 messages holds the worker for its fan-out: about 2 ms at 1,000
/// subscribers and 30 ms at 10,000 by the profile's user-space cost per delivery, what a slice
/// of 64 took at 10,000 before runs. One publisher's slice does not fill an outbox of the
/// default 1,024 frames; a much smaller `RUSTY_SOCKS_BUFFER` can (README says so).
const MESSAGES_PER_YIELD: u64 = 256;

/// Each message may fan out to many outboxes. Yielding every few messages makes a client that
/// pipelines thousands of them share its worker thread, so the sessions it feeds get to drain
/// their outboxes meanwhile instead of overflowing while this task runs uninterrupted.
async fn yield_every(handled: u64) {
    if handled > 0 && handled.is_multiple_of(MESSAGES_PER_YIELD) {
        tokio::task::yield_now().await;
    }
}

mod busy;
mod closing;
mod delay;
mod output;

#[cfg(test)]
mod tests;
