//! A fault-injecting TCP proxy for broker tests: the server under test talks to Redis or NATS
//! through it, and the test breaks the link in the ways networks and brokers break.
//!
//! - [`FaultProxy::pause`]: nothing passes in either direction, and nothing is lost: what was
//!   sent meanwhile arrives after [`FaultProxy::heal`], like a broker stopped with SIGSTOP or a
//!   stall that TCP rides out. New connections are accepted and held.
//! - [`FaultProxy::black_hole`]: nothing passes and nobody is told (no RST, no FIN), and the
//!   connections open at that moment never carry another byte, even after `heal`: like a
//!   partition that lasted until TCP silently gave up. Only deadlines and keepalives notice.
//!   New connections are held until `heal`, then pass.
//! - [`FaultProxy::reset`]: every open connection is closed at once with an RST; new ones pass.
//! - [`FaultProxy::cut_replies`]: a request that contains a given byte string is forwarded,
//!   and its connection is cut (RST both ways) once the answer comes back, which is thrown
//!   away: the broker applied the request, the client never hears so. Like a link that
//!   drops right after the request went through.
//!
//! - [`FaultProxy::hold_replies`]: answers on a connection that carried a request containing
//!   a given byte string are held back (nothing lost) until that string has been seen `n`
//!   times in all; then everything passes. Proves requests were sent without waiting for
//!   each other's answers (a pipeline): one at a time, the first answer never comes.
//!   [`FaultProxy::hold_replies_after`] lets the first few answers pass.
//!
//! Everything runs on the test's runtime and stops when the proxy is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the link does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Pause,
    BlackHole,
}

#[derive(Debug)]
struct Control {
    mode: watch::Sender<Mode>,
    /// Bumped by every `black_hole`: a connection older than the current value is dead.
    black_holes: AtomicU64,
    /// Bumped by every `reset`.
    resets: watch::Sender<u64>,
    /// The byte string whose requests lose their answers, and how many more times.
    cut: std::sync::Mutex<Option<(Vec<u8>, usize)>>,
    /// Connections cut so far by `cut_replies`.
    cuts: AtomicU64,
    /// The armed `hold_replies`, if any (its count changes notify the held connections).
    hold: watch::Sender<Option<Hold>>,
}

/// What [`FaultProxy::hold_replies`] armed.
#[derive(Debug)]
struct Hold {
    /// Tells this hold from earlier ones, for the connections that carried its needle.
    id: u64,
    needle: Vec<u8>,
    /// How many of the first requests are answered at once (a pipeline that sends its
    /// first request alone and waits for its answer).
    free: usize,
    want: usize,
    seen: usize,
}

impl Hold {
    /// Whether a connection that last carried hold `carried` must hold its answers now.
    fn holds(hold: &Option<Hold>, carried: u64) -> bool {
        hold.as_ref()
            .is_some_and(|h| h.id == carried && h.seen > h.free && h.seen < h.want)
    }
}

/// A TCP proxy in front of `target`; see the module docs.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    control: Arc<Control>,
    /// The accept loop and every connection's task: aborted on drop.
    _tasks: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let control = Arc::new(Control {
            mode: watch::Sender::new(Mode::Pass),
            black_holes: AtomicU64::new(0),
            resets: watch::Sender::new(0),
            cut: std::sync::Mutex::new(None),
            cuts: AtomicU64::new(0),
            hold: watch::Sender::new(None),
        });
        let tasks = tokio::spawn(accept_loop(listener, target, Arc::clone(&control)));
        Self {
            addr,
            control,
            _tasks: tasks,
        }
    }

    /// Where to connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `scheme://127.0.0.1:port` of the proxy, e.g. `url("redis")`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// Stops everything, losing nothing (see the module docs).
    pub fn pause(&self) {
        self.control.mode.send_replace(Mode::Pause);
    }

    /// Drops the link silently; open connections stay dead for good (see the module docs).
    pub fn black_hole(&self) {
        self.control.black_holes.fetch_add(1, Ordering::SeqCst);
        self.control.mode.send_replace(Mode::BlackHole);
    }

    /// Lets traffic pass again.
    pub fn heal(&self) {
        self.control.mode.send_replace(Mode::Pass);
    }

    /// The next `times` requests (client to target) containing `needle` lose their answers;
    /// see the module docs. A request split across reads is still found.
    pub fn cut_replies(&self, needle: &[u8], times: usize) {
        *self.control.cut.lock().unwrap() = Some((needle.to_vec(), times));
    }

    /// Stops cutting.
    pub fn stop_cutting(&self) {
        *self.control.cut.lock().unwrap() = None;
    }

    /// How many connections `cut_replies` cut so far.
    pub fn cuts(&self) -> u64 {
        self.control.cuts.load(Ordering::SeqCst)
    }

    /// Holds back the answers on every connection that sends a request containing `needle`
    /// until `needle` has been sent `n` times in all (counting from now, over every
    /// connection); see the module docs.
    pub fn hold_replies(&self, needle: &[u8], n: usize) {
        self.hold_replies_after(needle, 0, n);
    }

    /// [`FaultProxy::hold_replies`], except that the answers to the first `free` requests
    /// with `needle` pass at once.
    pub fn hold_replies_after(&self, needle: &[u8], free: usize, n: usize) {
        self.control.hold.send_modify(|hold| {
            let id = hold.as_ref().map_or(1, |h| h.id + 1);
            *hold = Some(Hold {
                id,
                needle: needle.to_vec(),
                free,
                want: n,
                seen: 0,
            });
        });
    }

    /// How many times the needle of `hold_replies` was sent so far.
    pub fn held_requests(&self) -> usize {
        self.control.hold.borrow().as_ref().map_or(0, |h| h.seen)
    }

    /// Resets every open connection (RST), then lets new ones pass.
    pub fn reset(&self) {
        self.control.resets.send_modify(|n| *n += 1);
        self.heal();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self._tasks.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, control: Arc<Control>) {
    // Connection tasks live in the set, so aborting this task (on drop) aborts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                connections.spawn(connection(client, target, Arc::clone(&control)));
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Waits until the link lets this connection's bytes pass; `None` if the connection is dead.
async fn passable(control: &Control, born: u64, mode: &mut watch::Receiver<Mode>) -> Option<()> {
    loop {
        if control.black_holes.load(Ordering::SeqCst) > born {
            return None;
        }
        if *mode.borrow_and_update() == Mode::Pass {
            return Some(());
        }
        if mode.changed().await.is_err() {
            return None;
        }
    }
}

async fn connection(client: TcpStream, target: SocketAddr, control: Arc<Control>) {
    let mut resets = control.resets.subscribe();
    resets.borrow_and_update();
    let mut mode = control.mode.subscribe();
    // Held while the link is down; it may come up again for new connections.
    let born = loop {
        let born = control.black_holes.load(Ordering::SeqCst);
        if *mode.borrow_and_update() == Mode::Pass {
            break born;
        }
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return },
            _ = resets.changed() => return reset(&client),
        }
    };
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return reset(&client);
    };
    let mut client = client;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Borrowed halves: unlike owned ones, they send no FIN of their own when dropped, so a
    // reset below is an RST and nothing else.
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let cut = Cut::default();
    let up = pump(
        client_read,
        upstream_write,
        &control,
        born,
        Some((&cut, true)),
    );
    let down = pump(
        upstream_read,
        client_write,
        &control,
        born,
        Some((&cut, false)),
    );
    let was_reset = tokio::select! {
        () = async { tokio::join!(up, down); } => false,
        _ = resets.changed() => true,
        () = cut.done(&control) => true,
    };
    if was_reset {
        reset(&client);
        reset(&upstream);
    }
}

/// A connection's state for [`FaultProxy::cut_replies`].
#[derive(Default)]
struct Cut {
    /// The request matched and was forwarded: nothing more goes back to the client.
    fired: std::sync::atomic::AtomicBool,
    /// Bytes came back after the request was forwarded (and were thrown away).
    answered: tokio::sync::Notify,
    /// The id of the last `hold_replies` whose needle this connection sent (0: none).
    carried: AtomicU64,
}

impl Cut {
    /// Once a request matched and an answer came back (the broker applied the request;
    /// at most 2 s), says the connection is to be reset.
    async fn done(&self, control: &Control) {
        loop {
            let wait = std::time::Duration::from_secs(2);
            let answered = tokio::time::timeout(wait, self.answered.notified()).await;
            // (Two seconds after a request was cut and no answer: cut anyway.)
            if answered.is_ok() || self.fired.load(Ordering::SeqCst) {
                break;
            }
        }
        // A margin, so a request that was answered before ours is not mistaken for it.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        control.cuts.fetch_add(1, Ordering::SeqCst);
    }
}

/// Whether `window` contains a needle armed by `cut_replies` (used up once found).
fn armed(control: &Control, window: &[u8]) -> bool {
    let mut cut = control.cut.lock().unwrap();
    let Some((needle, times)) = cut.as_mut() else {
        return false;
    };
    if *times == 0 || !window.windows(needle.len()).any(|w| w == needle.as_slice()) {
        return false;
    }
    *times -= 1;
    if *times == 0 {
        *cut = None;
    }
    true
}

/// Copies `from` to `to` while the link allows, until `from` ends. With `cut` (and whether
/// this is the client-to-target direction): a request matching [`FaultProxy::cut_replies`]
/// is forwarded, then this direction stops reading and the other one throws away what
/// comes back, until the connection is reset.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    control: &Control,
    born: u64,
    cut: Option<(&Cut, bool)>,
) {
    let mut mode = control.mode.subscribe();
    let mut hold = control.hold.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    // The tail of what came before, so a held needle split across reads is counted.
    let mut hold_tail: Vec<u8> = Vec::new();
    // The tail of what came before, so a needle split across reads is found.
    let mut window: Vec<u8> = Vec::new();
    loop {
        if passable(control, born, &mut mode).await.is_none() {
            // Dead for good: hold the sockets open and silent until the proxy goes away.
            std::future::pending::<()>().await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read while the link went down wait (pause) or vanish (black hole).
        if passable(control, born, &mut mode).await.is_none() {
            std::future::pending::<()>().await;
        }
        if let Some((cut, true)) = cut {
            // Counted before the request goes on, so its answer is held if it must be.
            count_held(control, cut, &mut hold_tail, &buf[..n]);
        }
        if let Some((cut, false)) = cut {
            while Hold::holds(
                &hold.borrow_and_update(),
                cut.carried.load(Ordering::SeqCst),
            ) {
                if hold.changed().await.is_err() {
                    break;
                }
            }
        }
        if let Some((cut, false)) = cut
            && cut.fired.load(Ordering::SeqCst)
        {
            cut.answered.notify_one();
            continue;
        }
        let matched = matches!(cut, Some((_, true))) && {
            window.extend_from_slice(&buf[..n]);
            let hit = armed(control, &window);
            let keep = window.len().saturating_sub(256);
            window.drain(..keep);
            hit
        };
        if matched && let Some((cut, _)) = cut {
            // Before the request goes: its answer must not slip through.
            cut.fired.store(true, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if matched {
            std::future::pending::<()>().await;
        }
    }
    // A plain end is passed on as a plain end.
    let _ = to.shutdown().await;
}

/// Counts the armed hold's needle in `bytes` (sent by the client), and marks the connection
/// as one whose answers it holds.
fn count_held(control: &Control, cut: &Cut, tail: &mut Vec<u8>, bytes: &[u8]) {
    control.hold.send_if_modified(|hold| {
        let Some(hold) = hold.as_mut() else {
            return false;
        };
        let len = hold.needle.len();
        if len == 0 {
            return false;
        }
        tail.extend_from_slice(bytes);
        let found = tail
            .windows(len)
            .filter(|w| *w == hold.needle.as_slice())
            .count();
        let keep = tail.len().saturating_sub(len - 1);
        tail.drain(..keep);
        if found == 0 {
            return false;
        }
        cut.carried.store(hold.id, Ordering::SeqCst);
        hold.seen += found;
        true
    });
}

/// Makes closing `stream` (when it is dropped) send an RST.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
