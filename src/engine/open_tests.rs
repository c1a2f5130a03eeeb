//! A `/ws` session over a real loopback socket whose broker does not answer: the welcome must
//! not wait for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use super::node_tests::faulty_node;
use crate::engine::admission::Admission;
use crate::engine::chat::{ChatHandler, ChatLimits, ChatShared, Dialect};
use crate::engine::outbox::Outbox;
use crate::engine::session::{Guards, SessionConfig, SessionParts};
use crate::engine::sessions::Sessions;
use crate::engine::stats::Stats;

/// Reads one unmasked server text frame (as the session writes them) within `wait`.
async fn read_text_frame(client: &mut TcpStream, wait: Duration) -> serde_json::Value {
    let read = async {
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.expect("frame header");
        assert_eq!(head[0], 0x81, "a final text frame");
        let len = match head[1] {
            126 => {
                let mut ext = [0u8; 2];
                client.read_exact(&mut ext).await.expect("length");
                usize::from(u16::from_be_bytes(ext))
            }
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        client.read_exact(&mut payload).await.expect("payload");
        serde_json::from_slice(&payload).expect("JSON frame")
    };
    tokio::time::timeout(wait, read)
        .await
        .expect("no frame within the wait")
}

#[tokio::test]
async fn the_welcome_does_not_wait_for_a_stalled_broker() {
    let (node, broker) = faulty_node();
    // Joining `default` (the legacy connection's open) never gets an answer from the broker.
    broker.stall_subscribe.store(true, Ordering::SeqCst);
    let shared = Arc::new(ChatShared {
        node: Arc::new(node),
        limits: arc_swap::ArcSwap::from_pointee(ChatLimits {
            replay: 10,
            max_channels: 16,
            max_data: 65536,
            rate: 0,
            burst: 0,
        }),
        proxy: Arc::new(crate::engine::backend::Proxy::new(Default::default())),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let sessions = Arc::new(Sessions::default());
    let admission = Admission::new(16, 16);
    let stats = Arc::new(Stats::default());
    let mut running = Vec::new();
    for (dialect, welcome) in [(Dialect::Legacy, "Connect"), (Dialect::V1, "welcome")] {
        let mut client = TcpStream::connect(address).await.expect("connect");
        let (socket, _) = listener.accept().await.expect("accept");
        let id = Uuid::new_v4();
        let (outbox, rx) = Outbox::new(id, 64);
        let guards = Guards {
            registration: sessions.register(outbox.clone()),
            permit: admission.try_connection().expect("a connection slot"),
            task: stats.task(),
        };
        let handler = ChatHandler::new(outbox, Arc::clone(&shared), None, dialect);
        let config = SessionConfig::new(
            65536,
            Some(Duration::from_secs(30)),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let session = SessionParts::new(rx, handler, config, guards).into_session(socket);
        running.push(tokio::spawn(session.run(Bytes::new())));
        let frame = read_text_frame(&mut client, Duration::from_secs(3)).await;
        assert_eq!(frame["type"], welcome, "{dialect:?}: {frame}");
        assert_eq!(frame["client_id"], id.to_string(), "{dialect:?}: {frame}");
    }
    for task in running {
        task.abort();
    }
}
