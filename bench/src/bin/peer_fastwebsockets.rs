//! Peer server for benchmarks: broadcast on `/ws` and echo on `/echo`, built on
//! fastwebsockets + hyper the way a careful user would: split halves, bounded queues, and a
//! writer that writes every ready frame into a buffered writer before one flush.
//!
//! With `--envelope true` it does per broadcast message what Rusty Socks' legacy chat path does
//! (see `rusty_bench::envelope`): parse, add an id and a timestamp, send the `Chat` frame.
//!
//! Usage: peer-fastwebsockets [--port 9002] [--threads 1] [--envelope false|true]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, after_handshake_split};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rusty_bench::Args;
use tokio::io::BufWriter;
use tokio::sync::mpsc;

/// What a connection's writer sends: shared text payloads, or control frames it owes.
enum Out {
    Text(Bytes),
    Control(OpCode, Vec<u8>),
}

type Clients = Arc<RwLock<HashMap<u64, mpsc::Sender<Out>>>>;

const QUEUE: usize = 1024;

fn main() {
    let args = Args::parse(std::env::args().skip(1)).unwrap_or_else(|e| {
        eprintln!("peer-fastwebsockets: {e}");
        std::process::exit(2)
    });
    let port = args.number("port", 9002).unwrap_or(9002) as u16;
    let threads = args.number("threads", 1).unwrap_or(1).max(1) as usize;
    let envelope = args.string("envelope", "false") == "true";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("peer-fastwebsockets: {e}");
            std::process::exit(1)
        });
    runtime.block_on(async move {
        let listener = match rusty_bench::listen(port) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("peer-fastwebsockets: cannot listen on {port}: {e}");
                std::process::exit(1)
            }
        };
        eprintln!("peer-fastwebsockets listening on 127.0.0.1:{port} (envelope={envelope})");
        let clients: Clients = Arc::default();
        let ids = Arc::new(AtomicU64::new(0));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let clients = Arc::clone(&clients);
            let ids = Arc::clone(&ids);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    handle(req, Arc::clone(&clients), id, envelope)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
}

async fn handle(
    mut req: Request<Incoming>,
    clients: Clients,
    id: u64,
    envelope: bool,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let echo = req.uri().path() == "/echo";
    let Ok((response, upgrade)) = fastwebsockets::upgrade::upgrade(&mut req) else {
        let mut bad = Response::new(Empty::new());
        *bad.status_mut() = hyper::StatusCode::BAD_REQUEST;
        return Ok(bad);
    };
    tokio::spawn(async move {
        if let Ok(ws) = upgrade.await {
            let _ = connection(ws.into_inner(), clients, id, echo, envelope).await;
        }
    });
    Ok(response)
}

async fn connection(
    io: TokioIo<hyper::upgrade::Upgraded>,
    clients: Clients,
    id: u64,
    echo: bool,
    envelope: bool,
) -> Result<(), WebSocketError> {
    let (read, write) = tokio::io::split(io);
    let (mut rx_ws, mut tx_ws) = after_handshake_split(
        read,
        BufWriter::with_capacity(64 * 1024, write),
        Role::Server,
    );
    tx_ws.set_writev(false);
    let (tx, mut rx) = mpsc::channel::<Out>(QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(out) = next {
                let written = match out {
                    Out::Text(bytes) => {
                        tx_ws
                            .write_frame(Frame::text(Payload::Borrowed(&bytes)))
                            .await
                    }
                    Out::Control(opcode, payload) => {
                        tx_ws
                            .write_frame(Frame::new(true, opcode, None, Payload::Owned(payload)))
                            .await
                    }
                };
                if written.is_err() {
                    return;
                }
                next = rx.try_recv().ok();
            }
            if tx_ws.flush().await.is_err() {
                return;
            }
        }
    });
    if !echo && let Ok(mut map) = clients.write() {
        map.insert(id, tx.clone());
    }
    let control = tx.clone();
    let mut send_fn = move |frame: Frame<'_>| {
        let control = control.clone();
        let out = Out::Control(frame.opcode, frame.payload.to_vec());
        async move { control.send(out).await.map_err(|_| "writer gone") }
    };
    loop {
        let frame = match rx_ws.read_frame(&mut send_fn).await {
            Ok(frame) => frame,
            Err(_) => break,
        };
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => {
                let bytes = if envelope && !echo {
                    match rusty_bench::envelope(&frame.payload) {
                        Some(chat) => Bytes::from(chat),
                        None => continue,
                    }
                } else {
                    Bytes::copy_from_slice(&frame.payload)
                };
                if echo {
                    if tx.send(Out::Text(bytes)).await.is_err() {
                        break;
                    }
                    continue;
                }
                let Ok(map) = clients.read() else { break };
                for (other, queue) in map.iter() {
                    // Slow receivers lose messages rather than stall everyone.
                    if *other != id {
                        let _ = queue.try_send(Out::Text(bytes.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    if let Ok(mut map) = clients.write() {
        map.remove(&id);
    }
    drop(tx);
    drop(send_fn);
    let _ = writer.await;
    Ok(())
}
