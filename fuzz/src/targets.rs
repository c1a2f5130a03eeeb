//! One function per parser a client (or another node) reaches. Each takes arbitrary bytes,
//! must never panic or hang, and checks what the parser promises: a property or an
//! independent oracle, not just "no crash".
//!
//! Compiled twice: by the fuzz crate (libFuzzer drives it) and by the server's test suite
//! (`tests/fuzz_corpus_test.rs` replays the committed corpora and regressions), so it uses
//! only the server crate's own dependencies.

use std::collections::BTreeMap;

use bytes::BytesMut;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use rusty_socks::broker::wire::{self, WireEvent};
use rusty_socks::protocol::{data::check_data, legacy, v1};
use rusty_socks::server::{query, token};
use rusty_socks::ws::close::{WsViolation, is_valid_received_code, parse_close_payload};
use rusty_socks::ws::frame::{MAX_CONTROL_PAYLOAD, apply_mask, encode_close, parse_header};
use rusty_socks::ws::handshake;
use rusty_socks::ws::reader::{Incoming, MessageReader};
use rusty_socks::ws::transport::{READ_CHUNK, reserve_for_read};
use serde_json::value::RawValue;

/// A fuzz target: arbitrary bytes in, a panic if the parser broke a promise.
pub type Target = fn(&[u8]);

/// Every target by name: the names are the directories under `fuzz/corpus/` and
/// `fuzz/regressions/`, and the binaries `fuzz/run.sh` runs.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_reader", frame_reader),
    ("close_payload", close_payload),
    ("upgrade_request", upgrade_request),
    ("query", query),
    ("legacy", legacy),
    ("v1", v1),
    ("wire", wire),
    ("data", data),
];

/// What a reader made of a byte stream: its messages, then the violation that stopped it.
type Outcome = (Vec<Incoming>, Option<WsViolation>);

/// Client bytes after the upgrade (`ws/frame.rs`, `ws/reader.rs`): frame headers, masking,
/// fragment reassembly, UTF-8 validation, the size limit.
///
/// Input: two bytes of message limit, one byte that picks the read sizes, then the stream.
/// The stream is read twice: all at once, and the way a session reads it (room from
/// `reserve_for_read`, reads of varying size into it). Both must give the same messages and
/// the same violation; every message must respect the limit and the UTF-8 rule; the read
/// buffer must stay in proportion to the bytes that arrived.
pub fn frame_reader(data: &[u8]) {
    let [a, b, reads, stream @ ..] = data else {
        return;
    };
    let max_message = usize::from(u16::from_be_bytes([*a, *b])) + 1;

    if let Ok(Some(header)) = parse_header(stream) {
        assert!((6..=14).contains(&header.header_len), "{header:?}");
        assert!(header.header_len <= stream.len(), "{header:?}");
        if header.opcode.is_control() {
            assert!(header.fin && header.payload_len <= MAX_CONTROL_PAYLOAD as u64);
        }
    }

    let whole = read_all_at_once(max_message, stream);
    let pieces = read_like_a_session(max_message, *reads, stream);
    assert_eq!(whole, pieces, "reading in pieces changed the outcome");
    for message in &whole.0 {
        match message {
            Incoming::Text(text) => {
                assert!(text.len() <= max_message);
                assert!(std::str::from_utf8(text).is_ok(), "text that is not UTF-8");
            }
            Incoming::Binary(data) => assert!(data.len() <= max_message),
            Incoming::Ping(payload) => assert!(payload.len() <= MAX_CONTROL_PAYLOAD),
            Incoming::Close(code) => assert!(code.is_none_or(is_valid_received_code)),
            Incoming::Pong => {}
        }
    }
}

fn read_all_at_once(max_message: usize, stream: &[u8]) -> Outcome {
    let mut reader = MessageReader::new(max_message);
    let mut buf = BytesMut::from(stream);
    let mut messages = Vec::new();
    loop {
        match reader.next(&mut buf) {
            Ok(Some(message)) => messages.push(message),
            Ok(None) => return (messages, None),
            Err(violation) => return (messages, Some(violation)),
        }
    }
}

fn read_like_a_session(max_message: usize, reads: u8, stream: &[u8]) -> Outcome {
    let mut reader = MessageReader::new(max_message);
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    let mut fed = 0;
    let mut turn = 0usize;
    while fed < stream.len() {
        reserve_for_read(&mut buf);
        // What the socket has this time: 1 to 256 bytes, varying with `reads`.
        turn += 1;
        let available = 1 + (usize::from(reads) * turn * 31 + turn) % 256;
        let n = available
            .min(buf.capacity() - buf.len())
            .min(stream.len() - fed);
        assert!(n > 0, "reserve_for_read left no room");
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        assert!(
            buf.capacity() <= 2 * fed + 2 * READ_CHUNK,
            "{} bytes of read buffer for {fed} bytes received",
            buf.capacity()
        );
        loop {
            match reader.next(&mut buf) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(violation) => return (messages, Some(violation)),
            }
        }
    }
    (messages, None)
}

/// A close frame's payload (`ws/close.rs`): parsed alone and inside a masked close frame
/// through the reader, with the same result; and any code we may send with any reason
/// (`encode_close` cuts it to fit) parses back to that code.
pub fn close_payload(data: &[u8]) {
    let payload = &data[..data.len().min(MAX_CONTROL_PAYLOAD)];
    let parsed = parse_close_payload(payload);
    match parsed {
        Ok(Some(code)) => {
            assert!(is_valid_received_code(code));
            assert!(std::str::from_utf8(&payload[2..]).is_ok());
        }
        Ok(None) => assert!(payload.is_empty()),
        Err(_) => {}
    }

    let mask = [0x5a, 0xa5, 0x3c, 0xc3];
    let mut frame = vec![0x88, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    let mut masked = payload.to_vec();
    apply_mask(&mut masked, mask);
    frame.extend_from_slice(&masked);
    let mut buf = BytesMut::from(&frame[..]);
    let through_reader = MessageReader::new(16).next(&mut buf);
    assert_eq!(
        through_reader,
        parsed.map(|code| Some(Incoming::Close(code)))
    );

    if let [hi, lo, reason @ ..] = data {
        let code = u16::from_be_bytes([*hi, *lo]);
        if is_valid_received_code(code) {
            let reason = String::from_utf8_lossy(reason);
            let mut out = BytesMut::new();
            encode_close(&mut out, code, &reason);
            assert_eq!(usize::from(out[1]), out.len() - 2, "close frame too long");
            assert_eq!(parse_close_payload(&out[2..]), Ok(Some(code)));
        }
    }
}

/// An upgrade request's target and headers, as hyper hands them over (`ws/handshake.rs`,
/// `server/token.rs`, `server/query.rs`): the accept key, where a token sits, which
/// subprotocol to select.
///
/// Input: the request target on the first line, then `name: value` lines; lines hyper would
/// refuse (names or values that are not valid HTTP) are skipped, as hyper never passes them.
pub fn upgrade_request(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let target = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut headers = HeaderMap::new();
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }

    match handshake::accept(&headers) {
        Ok(accept) => {
            let key = headers
                .get("sec-websocket-key")
                .expect("accepted without a key");
            assert_eq!(
                accept.as_bytes(),
                handshake::accept_key(key.as_bytes()).as_bytes()
            );
            assert_eq!(accept.len(), 28, "base64 of a SHA-1");
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }

    let query = target.split_once('?').map(|(_, q)| q);
    let presented = token::presented(&headers, query);
    let offered: Vec<String> = headers
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    if let Some(selected) = &presented.subprotocol {
        // RFC 6455 §4.2.2: the server may only select a subprotocol the client offered, and
        // the 101 must be able to carry it.
        assert!(offered.contains(selected), "{selected:?} was not offered");
        assert!(HeaderValue::from_str(selected).is_ok());
    }
    assert_eq!(presented.v1, offered.iter().any(|p| p == "rusty-socks.v1"));
    if presented.v1 {
        assert_eq!(presented.subprotocol.as_deref(), Some("rusty-socks.v1"));
    }
}

/// Query strings (`server/query.rs`): `percent_decode` against a strict reference decoder
/// (`%` and exactly two hex digits, UTF-8 result), and what `query_param` finds.
pub fn query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    assert_eq!(
        query::percent_decode(text),
        reference_percent_decode(text),
        "percent_decode({text:?})"
    );
    for name in ["token", "t", ""] {
        if let Some(value) = query::query_param(Some(text), name) {
            let pair = format!("{name}={value}");
            assert!(
                text.split('&').any(|p| p == pair),
                "{value:?} is not the value of a {name:?} pair in {text:?}"
            );
        }
    }
}

fn reference_percent_decode(text: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = hex(bytes.next()?)?;
            let lo = hex(bytes.next()?)?;
            out.push(hi << 4 | lo);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// A legacy chat message (`protocol/legacy.rs`): accepted ones keep sender and content and
/// get an RFC 3339 UTC timestamp; refused ones get an error frame that is valid JSON.
pub fn legacy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = time::OffsetDateTime::UNIX_EPOCH;
    // Anonymous, and on a connection whose token names a user (who becomes the sender).
    for user in [None, Some("token-user")] {
        match legacy::parse_chat(text, now, user) {
            Ok(chat) => {
                let sent: serde_json::Value =
                    serde_json::from_str(text).expect("accepted non-JSON");
                let sender = user.or(sent["sender"].as_str());
                assert_eq!(sender, Some(chat.sender.as_str()));
                assert_eq!(sent["content"].as_str(), Some(chat.content.as_str()));
                assert!(chat.timestamp.ends_with('Z'), "{}", chat.timestamp);
                let stamp = time::OffsetDateTime::parse(
                    &chat.timestamp,
                    &time::format_description::well_known::Rfc3339,
                );
                assert!(stamp.is_ok(), "{} does not parse back", chat.timestamp);
                let frame = legacy::ServerFrame::Chat(&chat).to_json();
                let json: serde_json::Value = serde_json::from_str(&frame).expect("frame is JSON");
                assert_eq!(json["type"], "Chat");
            }
            Err(err) => {
                let frame = legacy::ServerFrame::error(&err).to_json();
                let json: serde_json::Value = serde_json::from_str(&frame).expect("frame is JSON");
                assert_eq!(json["code"].as_str(), Some(err.code()));
            }
        }
    }
}

/// The data rules (`protocol/data.rs`) on valid JSON: what they accept, `serde_json` reads
/// back, also inside a frame that adds a few levels; what they refuse is refused for a reason
/// a reader would hit (too deep for the bound, or a value `serde_json` cannot hold).
pub fn data(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Only valid JSON reaches the rules: the syntax is checked first on every path.
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return;
    }
    let wrapped = format!(r#"{{"type":"history","publications":[{{"data":{text}}}]}}"#);
    match check_data(text) {
        Ok(()) => {
            let value: serde_json::Value =
                serde_json::from_str(&wrapped).expect("accepted data must read back in a frame");
            let again = serde_json::to_string(&value).expect("serializes");
            serde_json::from_str::<serde_json::Value>(&again).expect("and round-trips");
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
}

/// A text message on `/ws` (`protocol/v1.rs`): sorted into legacy, v1 command or error;
/// every error frame is valid JSON that carries the command's id; a v1-only connection never
/// gets a legacy answer.
pub fn v1(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_parsed(text, v1::parse(text));
    let v1_only = v1::parse_v1_only(text);
    assert!(
        !matches!(v1_only, v1::Parsed::Legacy | v1::Parsed::Invalid(_)),
        "a v1-only connection got {v1_only:?}"
    );
    check_parsed(text, v1_only);
}

fn check_parsed(text: &str, parsed: v1::Parsed<'_>) {
    match parsed {
        // The legacy parser takes it from here (and may still refuse it: a number too large
        // for a float is valid JSON syntax that routing accepts and the legacy parser does not).
        v1::Parsed::Legacy => legacy(text.as_bytes()),
        v1::Parsed::Invalid(err) => {
            let frame = legacy::ServerFrame::error(&err).to_json();
            assert_eq!(fields(&frame)["code"].get(), format!("\"{}\"", err.code()));
        }
        v1::Parsed::BadCommand(id, err) => {
            let frame = v1::Frame::error(id, &err).to_json();
            let frame = fields(&frame);
            assert_eq!(frame["code"].get(), format!("\"{}\"", err.code()));
            if let Some(id) = id {
                assert_id(id);
                assert_eq!(frame["id"].get(), id.get(), "the error must carry the id");
            }
        }
        v1::Parsed::Command(id, command) => {
            if let Some(id) = id {
                assert_id(id);
            }
            if let v1::Command::Publish { data, .. } = command {
                assert!(serde_json::from_str::<&RawValue>(data.get()).is_ok());
            }
        }
    }
}

/// The top-level fields of a JSON object, unparsed. Only the syntax is checked: a client's
/// number may be too large for a float and is still valid JSON, echoed as sent.
fn fields(json: &str) -> BTreeMap<String, &RawValue> {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("not a JSON object ({e}): {json}"))
}

/// Ids are JSON numbers or strings.
fn assert_id(id: &RawValue) {
    let first = id.get().bytes().next();
    assert!(
        matches!(first, Some(b'"' | b'-' | b'0'..=b'9')),
        "id {}",
        id.get()
    );
}

/// A message from another node (`broker/wire.rs`): whatever decodes encodes back to bytes
/// that decode to the same event.
pub fn wire(data: &[u8]) {
    let Ok(event) = wire::decode(data) else {
        return;
    };
    match event {
        WireEvent::Publication { epoch, publication } => {
            // Epochs the server generates never contain the separator; one that does cannot
            // have come from `decode`.
            assert!(!epoch.contains('|'), "epoch {epoch:?}");
            let again = wire::decode(&wire::publication(&epoch, &publication));
            match again {
                Ok(WireEvent::Publication {
                    epoch: epoch2,
                    publication: p2,
                }) => {
                    assert_eq!(epoch2, epoch);
                    assert_eq!(p2.offset, publication.offset);
                    assert_eq!(p2.client_id, publication.client_id);
                    assert_eq!(p2.data.get(), publication.data.get());
                }
                other => panic!("re-encoded publication decodes to {other:?}"),
            }
        }
        WireEvent::Join(client) | WireEvent::Leave(client) => {
            let leave = data.starts_with(b"l|");
            match wire::decode(&wire::presence_change(&client, leave)) {
                Ok(WireEvent::Join(c)) if !leave => assert_eq!(c, client),
                Ok(WireEvent::Leave(c)) if leave => assert_eq!(c, client),
                other => panic!("re-encoded presence change decodes to {other:?}"),
            }
        }
        WireEvent::Run { run, offset } => {
            assert!(run > 1 && offset > 0, "run {run} at {offset}");
            assert_eq!(
                wire::run(run, offset),
                data,
                "only the canonical form decodes"
            );
        }
    }
}
