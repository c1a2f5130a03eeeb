//! The session's write path over real TLS on a real loopback socket. A full send buffer is simulated
//! by a gate in front of the socket: the kernel's buffer sizes (megabytes on loopback) would
//! make the moment a write blocks a matter of luck.
use super::*;
use crate::engine::admission::Admission;
use crate::engine::echo::EchoHandler;
use crate::engine::outbox::Outbox;
use crate::engine::sessions::Sessions;
use crate::ws::transport::Buffered;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

const WAIT: Duration = Duration::from_secs(5);
/// The largest session future of a chat connection on plain TCP that still makes a task of
/// 384 bytes or less (see `the_session_task_of_a_chat_connection_stays_within_its_size_class`):
/// tokio's task cell adds 104 bytes to the future it runs (header 32, scheduler handle, task
/// id and stage tag 24, trailer 48) and the `TaskTracker` 8 more, and rounds up to 128. (It
/// was 512: the buffers, the parser and the queue-to-socket stamp now live in `Busy`, boxed and
/// dropped while idle.) The allocator is asked for 384 bytes per idle connection instead of
/// 512; the binary's allocator (`src/allocator.rs`) serves such 128-aligned blocks at their
/// exact size, where mimalloc alone would take the next power of two (docs/BENCHMARKS.md,
/// "Idle memory, fourth pass").
const SESSION_FUTURE_LIMIT: usize = 384 - 112;

/// Whether writes are held back, the waker of the last held-back write, and whether one
/// was held back since the gate closed.
#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    waker: Option<Waker>,
    blocked: bool,
}

#[derive(Debug, Clone, Default)]
struct GateControl(Arc<Mutex<GateState>>);

impl GateControl {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.blocked = false;
    }

    fn open(&self) {
        let waker = {
            let mut state = self.state();
            state.closed = false;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Waits until a write was held back: the session has handed its bytes to TLS.
    async fn wait_blocked(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.state().blocked {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the session never wrote"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A socket behind a gate: closed, it accepts no bytes, like a full send buffer.
struct Gate {
    io: TcpStream,
    control: GateControl,
}

impl Gate {
    fn held(&self, cx: &Context<'_>) -> bool {
        let mut state = self.control.state();
        if state.closed {
            state.waker = Some(cx.waker().clone());
            state.blocked = true;
        }
        state.closed
    }
}

impl AsyncRead for Gate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.held(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.held(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.held(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type Client = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS server end (behind a gate) and its client, over loopback.
async fn tls_pair() -> (tokio_rustls::server::TlsStream<Gate>, Client, GateControl) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .expect("self-signed certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certified.cert.der().clone())
        .expect("root certificate");
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let client = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        tokio_rustls::TlsConnector::from(Arc::new(client_config))
            .connect(name, tcp)
            .await
            .expect("client handshake")
    };
    let control = GateControl::default();
    let server = async {
        let (tcp, _) = listener.accept().await.expect("accept");
        let gate = Gate {
            io: tcp,
            control: control.clone(),
        };
        tokio_rustls::TlsAcceptor::from(Arc::new(server_config))
            .accept(gate)
            .await
            .expect("server handshake")
    };
    let (client, server) = timeout(WAIT, async { tokio::join!(client, server) })
        .await
        .expect("TLS handshake in time");
    (server, client, control)
}

/// An echo session on the server end; returns its outbox.
fn start(server: tokio_rustls::server::TlsStream<Gate>) -> Outbox {
    let stats = Arc::new(Stats::default());
    let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 64);
    let sessions: Arc<Sessions> = Arc::default();
    let admission = Admission::new(10, 10);
    let guards = Guards {
        registration: sessions.register(outbox.clone()),
        permit: admission.try_connection().expect("a free slot"),
        task: stats.task(),
    };
    let config = SessionConfig::new(
        64 * 1024,
        Some(Duration::from_secs(30)),
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    let session =
        SessionParts::new(rx, EchoHandler, config, guards).into_session(Buffered::new(server));
    tokio::spawn(session.run(Bytes::new()));
    outbox
}

async fn read_exactly(client: &mut Client, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    timeout(WAIT, client.read_exact(&mut got))
        .await
        .expect("the bytes arrive once the socket takes them")
        .expect("read");
    got
}

#[tokio::test]
async fn frames_written_while_the_socket_was_full_go_out_once_it_takes_them() {
    let (server, mut client, gate) = tls_pair().await;
    let outbox = start(server);
    gate.close();
    let mut frame = BytesMut::new();
    encode_into(&mut frame, OpCode::Text, b"queued while full");
    let frame = frame.freeze();
    outbox.try_push(frame.clone());
    // TLS took the frame's bytes and found the socket full: the ciphertext waits in TLS.
    gate.wait_blocked().await;
    // Nothing else happens on this connection (no ping for 30 s): only a flush sends it.
    gate.open();
    assert_eq!(read_exactly(&mut client, frame.len()).await, frame);
}

#[tokio::test]
async fn the_close_reply_written_while_the_socket_was_full_is_not_lost() {
    let (server, mut client, gate) = tls_pair().await;
    let _outbox = start(server);
    gate.close();
    // A masked close frame with code 1000 (zero mask key).
    client
        .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .await
        .expect("write");
    client.flush().await.expect("flush");
    gate.wait_blocked().await;
    gate.open();
    assert_eq!(read_exactly(&mut client, 4).await, [0x88, 0x02, 0x03, 0xe8]);
}

#[test]
fn session_durations_up_to_the_settings_limits_are_kept_exactly() {
    let day = Duration::from_secs(86_400);
    let config = SessionConfig::new(64 << 20, Some(day), day, Duration::from_secs(4));
    assert_eq!(config.ping_interval(), Some(day));
    assert_eq!(config.timeout(), day);
    assert_eq!(config.close_grace(), Duration::from_secs(4));
    assert_eq!(config.max_message(), 64 << 20);
    // Beyond 49.7 days a duration saturates: still "practically never", never wrapped short.
    let long = SessionConfig::new(1, None, Duration::from_secs(100 * 86_400), day);
    assert!(long.timeout() > Duration::from_secs(49 * 86_400));
    assert_eq!(long.ping_interval(), None);
}

/// The size of what `f` returns, without calling it.
fn returned_size<A, B, R>(_: fn(A, B) -> R) -> usize {
    std::mem::size_of::<R>()
}

/// Every idle `/ws` connection holds one task for its whole life, as large as the largest
/// state its future can be in, plus tokio's header and trailer, rounded up to a multiple of
/// 128 bytes (tokio aligns tasks to a cache line pair). A state that grows past this bound
/// (a new local kept across the main loop's await, an unboxed cold path) puts every idle
/// connection into the next size class: docs/BENCHMARKS.md, "How RSS per connection is
/// measured".
#[test]
fn the_session_task_of_a_chat_connection_stays_within_its_size_class() {
    let size = returned_size(Session::<TcpStream, crate::engine::chat::ChatHandler>::run);
    eprintln!("session future of a chat connection: {size} bytes");
    assert!(size <= SESSION_FUTURE_LIMIT, "{size} bytes");
}

/// Shutdown asks every registered session to close (`Sessions::close_all`); a session that
/// registers after that pass, its handshake still under way then, finds the registry closing
/// when it starts and closes with 1001 at once instead of living on unasked.
#[tokio::test]
async fn a_session_registered_after_close_all_closes_with_1001_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut client = TcpStream::connect(listener.local_addr().expect("address"))
        .await
        .expect("connect");
    let (socket, _) = listener.accept().await.expect("accept");
    let stats = Arc::new(Stats::default());
    let sessions: Arc<Sessions> = Arc::default();
    let admission = Admission::new(10, 10);
    sessions.close_all();
    let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 8);
    let guards = Guards {
        registration: sessions.register(outbox),
        permit: admission.try_connection().expect("a free slot"),
        task: stats.task(),
    };
    let config = SessionConfig::new(1024, None, Duration::from_secs(60), Duration::from_secs(1));
    let session = SessionParts::new(rx, EchoHandler, config, guards).into_session(socket);
    let task = tokio::spawn(session.run(Bytes::new()));
    let mut head = [0u8; 2];
    timeout(WAIT, client.read_exact(&mut head))
        .await
        .expect("a close frame in time")
        .expect("read");
    assert_eq!(head[0], 0x88, "a close frame");
    let mut payload = vec![0u8; usize::from(head[1])];
    client.read_exact(&mut payload).await.expect("read");
    assert_eq!(payload[..2], [0x03, 0xe9], "close 1001");
    // The client answers the close; the session ends and leaves the registry.
    client
        .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe9])
        .await
        .expect("write");
    timeout(WAIT, task)
        .await
        .expect("the session ends")
        .expect("no panic");
    assert!(sessions.is_empty());
}
