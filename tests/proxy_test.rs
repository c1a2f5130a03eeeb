//! The fault-injecting proxy the broker fault tests rely on does what it says, against a plain
//! TCP echo server: a test of the test tool, so a broken proxy cannot make a fault test pass.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::proxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, text: &[u8], wait: Duration) -> Option<Vec<u8>> {
    stream.write_all(text).await.ok()?;
    let mut buf = vec![0u8; text.len()];
    timeout(wait, stream.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(buf)
}

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

#[tokio::test]
async fn pause_holds_everything_and_loses_nothing() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        round_trip(&mut stream, b"one", LONG).await.as_deref(),
        Some(&b"one"[..])
    );
    proxy.pause();
    assert_eq!(
        round_trip(&mut stream, b"two", SHORT).await,
        None,
        "nothing passes"
    );
    proxy.heal();
    let mut buf = [0u8; 3];
    timeout(LONG, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &buf, b"two",
        "what was sent during the pause arrives after it"
    );
}

#[tokio::test]
async fn a_black_hole_kills_open_connections_silently_and_new_ones_pass_after_healing() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(round_trip(&mut old, b"one", LONG).await.is_some());
    proxy.black_hole();
    assert_eq!(round_trip(&mut old, b"two", SHORT).await, None);
    proxy.heal();
    assert_eq!(
        round_trip(&mut old, b"three", SHORT).await,
        None,
        "dead for good, no RST"
    );
    let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        round_trip(&mut new, b"four", LONG).await.as_deref(),
        Some(&b"four"[..])
    );
}

#[tokio::test]
async fn reset_closes_open_connections_with_an_rst() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(round_trip(&mut stream, b"one", LONG).await.is_some());
    proxy.reset();
    let mut buf = [0u8; 8];
    let read = timeout(LONG, stream.read(&mut buf)).await.unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(round_trip(&mut new, b"two", LONG).await.is_some());
}
