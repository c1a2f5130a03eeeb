//! Peer server for benchmarks: broadcast on `/ws` and echo on `/echo`, built on
//! tokio-tungstenite the way a careful user would: one reader and one writer task per
//! connection, bounded queues, and a writer that feeds every ready message before one flush.
//!
//! With `--envelope true` it does per broadcast message what Rusty Socks' legacy chat path does
//! (see `rusty_bench::envelope`): parse, add an id and a timestamp, send the `Chat` frame.
//!
//! Usage: peer-tungstenite [--port 9001] [--threads 1] [--batch true|false] [--envelope false|true]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::{SinkExt, StreamExt};
use rusty_bench::Args;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

type Clients = Arc<RwLock<HashMap<u64, mpsc::Sender<Message>>>>;

const QUEUE: usize = 1024;

fn main() {
    let args = Args::parse(std::env::args().skip(1)).unwrap_or_else(|e| {
        eprintln!("peer-tungstenite: {e}");
        std::process::exit(2)
    });
    let port = args.number("port", 9001).unwrap_or(9001) as u16;
    let threads = args.number("threads", 1).unwrap_or(1).max(1) as usize;
    let batch = args.string("batch", "true") == "true";
    let envelope = args.string("envelope", "false") == "true";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("peer-tungstenite: {e}");
            std::process::exit(1)
        });
    runtime.block_on(async move {
        let listener = match rusty_bench::listen(port) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("peer-tungstenite: cannot listen on {port}: {e}");
                std::process::exit(1)
            }
        };
        eprintln!(
            "peer-tungstenite listening on 127.0.0.1:{port} (batch={batch}, envelope={envelope})"
        );
        let clients: Clients = Arc::default();
        let ids = Arc::new(AtomicU64::new(0));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let clients = Arc::clone(&clients);
            let id = ids.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(serve(stream, clients, id, batch, envelope));
        }
    });
}

async fn serve(stream: TcpStream, clients: Clients, id: u64, batch: bool, envelope: bool) {
    let _ = stream.set_nodelay(true);
    let mut path = String::new();
    #[expect(
        clippy::result_large_err,
        reason = "the callback's signature is tungstenite's"
    )]
    let callback = |req: &Request, resp: Response| {
        path = req.uri().path().to_owned();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let echo = path == "/echo";
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if !batch {
                if sink.send(first).await.is_err() {
                    return;
                }
                continue;
            }
            if sink.feed(first).await.is_err() {
                return;
            }
            while let Ok(next) = rx.try_recv() {
                if sink.feed(next).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    if !echo && let Ok(mut map) = clients.write() {
        map.insert(id, tx.clone());
    }
    while let Some(Ok(message)) = stream.next().await {
        match message {
            Message::Text(_) | Message::Binary(_)
                if echo && tx.send(message.clone()).await.is_err() =>
            {
                break;
            }
            Message::Text(_) | Message::Binary(_) if echo => {}
            Message::Text(_) | Message::Binary(_) => {
                let message = if envelope {
                    let Some(chat) = rusty_bench::envelope(&message.into_data()) else {
                        continue;
                    };
                    Message::text(chat)
                } else {
                    message
                };
                let Ok(map) = clients.read() else { break };
                for (other, queue) in map.iter() {
                    // Slow receivers lose messages rather than stall everyone.
                    if *other != id {
                        let _ = queue.try_send(message.clone());
                    }
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    if let Ok(mut map) = clients.write() {
        map.remove(&id);
    }
    drop(tx);
    let _ = writer.await;
}
