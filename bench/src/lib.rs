//! Shared pieces of the benchmark tools: a minimal WebSocket client, argument parsing, latency
//! percentiles and `/proc` readers.
//!
//! The client is deliberately bare (fixed handshake key, zero mask, frames parsed in place) so
//! the load generator costs as little CPU per message as possible and is not what limits a run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Parsed `--key value` arguments.
#[derive(Debug, Default)]
pub struct Args {
    values: HashMap<String, String>,
}

impl Args {
    /// Parses `--key value` pairs (and bare `--flag`s, stored as "true").
    pub fn parse(args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut values = HashMap::new();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let Some(key) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument {arg:?}"));
            };
            let value = match args.peek() {
                Some(next) if !next.starts_with("--") => args.next().unwrap_or_default(),
                _ => "true".to_owned(),
            };
            values.insert(key.to_owned(), value);
        }
        Ok(Self { values })
    }

    /// A string argument with a default.
    pub fn string(&self, key: &str, default: &str) -> String {
        self.values
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    }

    /// A number argument with a default.
    pub fn number(&self, key: &str, default: u64) -> Result<u64, String> {
        match self.values.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{key} must be a whole number, got {v:?}")),
        }
    }

    /// Whether a flag was given.
    pub fn flag(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }
}

/// Splits `ws://host:port/path` into an address and a path.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("only ws:// URLs are supported, got {url:?}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let addr: SocketAddr = host
        .replace("localhost", "127.0.0.1")
        .parse()
        .map_err(|_| format!("host must be IP:port, got {host:?}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("load goes to loopback only, got {addr}"));
    }
    Ok((addr, path))
}

/// Listens on `127.0.0.1:port` with the same accept backlog (4096) as Rusty Socks, so connect
/// figures compare servers, not kernel defaults.
pub fn listen(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(4096)
}

/// Opens a WebSocket connection; returns the stream and any bytes read past the handshake.
pub async fn ws_connect(addr: SocketAddr, path: &str) -> std::io::Result<(TcpStream, BytesMut)> {
    ws_connect_offering(addr, path, "").await
}

/// [`ws_connect`] offering `extensions` (`Sec-WebSocket-Extensions`, none when empty), e.g.
/// permessage-deflate.
pub async fn ws_connect_offering(
    addr: SocketAddr,
    path: &str,
    extensions: &str,
) -> std::io::Result<(TcpStream, BytesMut)> {
    ws_handshake(addr, path, extensions)
        .await
        .map(|(stream, buf, _)| (stream, buf))
}

/// [`ws_connect_offering`] that also returns the server's response head (status line and
/// headers), to see what it agreed to.
pub async fn ws_handshake(
    addr: SocketAddr,
    path: &str,
    extensions: &str,
) -> std::io::Result<(TcpStream, BytesMut, String)> {
    let offer = if extensions.is_empty() {
        String::new()
    } else {
        format!("Sec-WebSocket-Extensions: {extensions}\r\n")
    };
    handshake(addr, path, &offer).await
}

/// [`ws_connect`] with extra request header lines (each ending in `\r\n`), e.g. a
/// `Sec-WebSocket-Protocol` offer.
pub async fn ws_connect_with_headers(
    addr: SocketAddr,
    path: &str,
    offer: &str,
) -> std::io::Result<(TcpStream, BytesMut)> {
    handshake(addr, path, offer)
        .await
        .map(|(stream, buf, _)| (stream, buf))
}

/// The upgrade with extra header lines: the stream, the bytes read past the response head,
/// and the head.
async fn handshake(
    addr: SocketAddr,
    path: &str,
    offer: &str,
) -> std::io::Result<(TcpStream, BytesMut, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other("closed during handshake"));
        }
        if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                let line = String::from_utf8_lossy(&buf[..buf.len().min(40)]).into_owned();
                return Err(std::io::Error::other(format!("refused: {line}")));
            }
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.advance(end + 4);
            return Ok((stream, buf, head));
        }
        if buf.len() > 8192 {
            return Err(std::io::Error::other("handshake response too long"));
        }
    }
}

/// Appends one masked client frame (zero mask key: the payload goes out unchanged).
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

/// Calls `f(opcode, payload)` for every complete server frame at the front of `buf`.
pub fn each_frame(buf: &mut BytesMut, mut f: impl FnMut(u8, &[u8])) {
    each_frame_raw(buf, |first, payload| f(first & 0x0F, payload));
}

/// Inflates one permessage-deflate message (no context takeover) with `d`, reset first.
pub fn inflate_message(d: &mut flate2::Decompress, payload: &[u8], out: &mut Vec<u8>) {
    d.reset(false);
    out.clear();
    out.reserve(payload.len() * 8 + 64);
    for input in [payload, &[0, 0, 0xff, 0xff][..]] {
        let base = d.total_in();
        while ((d.total_in() - base) as usize) < input.len() {
            if out.len() == out.capacity() {
                out.reserve(out.capacity());
            }
            let consumed = (d.total_in() - base) as usize;
            if d.decompress_vec(&input[consumed..], out, flate2::FlushDecompress::Sync)
                .is_err()
            {
                return;
            }
        }
    }
}

/// [`each_frame`] with the frame's whole first byte (FIN, RSV1-3, opcode) instead of the opcode.
pub fn each_frame_raw(buf: &mut BytesMut, mut f: impl FnMut(u8, &[u8])) {
    loop {
        if buf.len() < 2 {
            return;
        }
        let (len, header) = match buf[1] & 0x7F {
            126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() >= 10 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(be) as usize, 10)
            }
            126 | 127 => return,
            n => (usize::from(n), 2),
        };
        if buf.len() < header + len {
            buf.reserve(header + len - buf.len());
            return;
        }
        f(buf[0], &buf[header..header + len]);
        buf.advance(header + len);
    }
}

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<u32>,
}

impl Latencies {
    /// Records one sample.
    pub fn record(&mut self, micros: u64) {
        self.samples.push(micros.min(u64::from(u32::MAX)) as u32);
    }

    /// Adds another set.
    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// `(p50, p99, p999)` in microseconds.
    pub fn percentiles(&mut self) -> (u32, u32, u32) {
        if self.samples.is_empty() {
            return (0, 0, 0);
        }
        self.samples.sort_unstable();
        let at = |q: f64| self.samples[((self.samples.len() - 1) as f64 * q) as usize];
        (at(0.50), at(0.99), at(0.999))
    }
}

/// CPU time (user + system) a process has used.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    rusty_socks::engine::load::parse_cpu(&stat)
}

/// Resident set size of a process, in KiB.
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What a peer's envelope mode does per message, the work the legacy chat path does: parse
/// `{"sender","content"}` with serde_json, add a v4 UUID and an RFC 3339 UTC timestamp, and
/// encode the `Chat` frame Rusty Socks broadcasts
/// (`{"type":"Chat","id":..,"sender":..,"content":..,"timestamp":..}`). `None` if the message
/// is not such an object.
pub fn envelope(message: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct In {
        sender: String,
        content: String,
    }
    #[derive(serde::Serialize)]
    #[serde(tag = "type")]
    enum Out<'a> {
        Chat {
            id: uuid::Uuid,
            sender: &'a str,
            content: &'a str,
            timestamp: String,
        },
    }
    let input: In = serde_json::from_slice(message).ok()?;
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .ok()?;
    serde_json::to_string(&Out::Chat {
        id: uuid::Uuid::new_v4(),
        sender: &input.sender,
        content: &input.content,
        timestamp,
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_parser() {
        // Server frames are unmasked; build them by hand.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x81, 2, b'h', b'i', 0x89, 0]);
        let mut long = vec![0x82, 126, 0x01, 0x00];
        long.extend(vec![7u8; 256]);
        buf.extend_from_slice(&long);
        let mut seen = Vec::new();
        each_frame(&mut buf, |op, p| seen.push((op, p.len())));
        assert_eq!(seen, vec![(1, 2), (9, 0), (2, 256)]);
        assert!(buf.is_empty());
    }

    #[test]
    fn urls_must_be_loopback() {
        assert!(parse_url("ws://127.0.0.1:3030/ws").is_ok());
        assert!(parse_url("ws://10.0.0.1:3030/ws").is_err());
        assert!(parse_url("http://127.0.0.1:3030/ws").is_err());
    }

    #[test]
    fn percentiles_pick_the_right_samples() {
        let mut l = Latencies::default();
        for n in 1..=1000 {
            l.record(n);
        }
        assert_eq!(l.percentiles(), (500, 990, 999));
    }

    #[test]
    fn envelopes_have_the_legacy_chat_shape() {
        let out = envelope(br#"{"sender":"p","content":"hi there"}"#).expect("a chat message");
        let text = out;
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["type"], "Chat");
        assert_eq!(value["sender"], "p");
        assert_eq!(value["content"], "hi there");
        let id = value["id"].as_str().expect("an id");
        assert_eq!(
            uuid::Uuid::parse_str(id).expect("a uuid").get_version_num(),
            4
        );
        let ts = value["timestamp"].as_str().expect("a timestamp");
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .expect("rfc 3339");
        assert!(text.starts_with(r#"{"type":"Chat","id":""#), "{text}");
        assert!(envelope(b"not json").is_none());
        assert!(envelope(br#"{"sender":1,"content":"x"}"#).is_none());
    }
}
