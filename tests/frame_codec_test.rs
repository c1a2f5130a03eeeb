//! Properties of the RFC 6455 codec (`ws/frame.rs`, `ws/reader.rs`) over generated frames:
//! encoding then parsing is the identity, the way a byte stream is cut into reads never
//! changes the messages, and masking round-trips at any length and alignment. Server frames
//! are also decoded by an independent implementation (tungstenite, what the tests' clients
//! use).
#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rusty_socks::ws::frame::{OpCode, apply_mask, encode, encode_into, parse_header};
use rusty_socks::ws::reader::{Incoming, MessageReader};
use rusty_socks::ws::transport::reserve_for_read;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader as PeerHeader;

const OPCODES: [OpCode; 6] = [
    OpCode::Continuation,
    OpCode::Text,
    OpCode::Binary,
    OpCode::Close,
    OpCode::Ping,
    OpCode::Pong,
];

fn bits(opcode: OpCode) -> u8 {
    match opcode {
        OpCode::Continuation => 0x0,
        OpCode::Text => 0x1,
        OpCode::Binary => 0x2,
        OpCode::Close => 0x8,
        OpCode::Ping => 0x9,
        OpCode::Pong => 0xA,
    }
}

/// A client frame: the server's own encoder lays out the length, then the frame gets what a
/// client adds (the FIN bit as wanted, the mask bit, the key, the masked payload).
fn client_frame(fin: bool, opcode: OpCode, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut server = BytesMut::new();
    encode_into(&mut server, opcode, payload);
    let header_len = server.len() - payload.len();
    let mut out = server[..header_len].to_vec();
    if !fin {
        out[0] &= 0x7F;
    }
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    let mut body = payload.to_vec();
    apply_mask(&mut body, mask);
    out.extend_from_slice(&body);
    out
}

/// Payload lengths around every boundary of the three length forms, and anything up to 70 000.
fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..130,
        prop::sample::select(vec![125usize, 126, 127, 65_535, 65_536, 65_537]),
        0usize..70_000,
    ]
}

/// One thing a client says, and how it sends it.
#[derive(Debug, Clone)]
enum Said {
    /// A data message, cut into fragments at these points, with a ping after some fragments.
    Message {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<usize>,
        pings_after: Vec<bool>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn said() -> impl Strategy<Value = Said> {
    let text = (
        ".{0,40}",
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    )
        .prop_map(|(s, cuts)| (true, s.into_bytes(), cuts));
    let binary = (
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    )
        .prop_map(|(b, cuts)| (false, b, cuts));
    prop_oneof![
        4 => (prop_oneof![text, binary], prop::collection::vec(any::<bool>(), 4)).prop_map(
            |((text, payload, cuts), pings_after)| {
                let mut cuts: Vec<usize> =
                    cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
                cuts.sort_unstable();
                Said::Message { text, payload, cuts, pings_after }
            }
        ),
        1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Said::Ping),
        1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Said::Pong),
    ]
}

/// The bytes a client sends for `said`, and the messages the server must see.
fn conversation(said: &[Said], mask: [u8; 4]) -> (Vec<u8>, Vec<Incoming>) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for s in said {
        match s {
            Said::Message {
                text,
                payload,
                cuts,
                pings_after,
            } => {
                let mut start = 0;
                let ends: Vec<usize> = cuts.iter().copied().chain([payload.len()]).collect();
                for (i, end) in ends.iter().enumerate() {
                    let opcode = match (i, text) {
                        (0, true) => OpCode::Text,
                        (0, false) => OpCode::Binary,
                        _ => OpCode::Continuation,
                    };
                    let last = i == ends.len() - 1;
                    stream.extend(client_frame(last, opcode, mask, &payload[start..*end]));
                    start = *end;
                    // Control frames may come between fragments (RFC 6455 §5.4).
                    if !last && pings_after.get(i) == Some(&true) {
                        stream.extend(client_frame(true, OpCode::Ping, mask, b"between"));
                        expected.push(Incoming::Ping(Bytes::from_static(b"between")));
                    }
                }
                let payload = Bytes::from(payload.clone());
                expected.push(if *text {
                    Incoming::Text(payload)
                } else {
                    Incoming::Binary(payload)
                });
            }
            Said::Ping(p) => {
                stream.extend(client_frame(true, OpCode::Ping, mask, p));
                expected.push(Incoming::Ping(Bytes::from(p.clone())));
            }
            Said::Pong(p) => {
                stream.extend(client_frame(true, OpCode::Pong, mask, p));
                expected.push(Incoming::Pong);
            }
        }
    }
    (stream, expected)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_then_parse_is_the_identity(
        fin in any::<bool>(),
        opcode in prop::sample::select(OPCODES.to_vec()),
        mask in any::<[u8; 4]>(),
        len in payload_len(),
        seed in any::<u8>(),
    ) {
        // Control frames are never fragmented and carry at most 125 bytes.
        let (fin, len) = if opcode.is_control() { (true, len % 126) } else { (fin, len) };
        let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let frame = client_frame(fin, opcode, mask, &payload);
        let header = parse_header(&frame).unwrap().unwrap();
        prop_assert_eq!(header.fin, fin);
        prop_assert_eq!(header.opcode, opcode);
        prop_assert_eq!(header.mask, mask);
        prop_assert_eq!(header.payload_len, len as u64);
        prop_assert_eq!(header.header_len + len, frame.len());
        let mut body = frame[header.header_len..].to_vec();
        apply_mask(&mut body, header.mask);
        prop_assert!(body == payload);
        // Every proper prefix of the header is "not yet", never an error.
        for cut in 0..header.header_len {
            prop_assert_eq!(parse_header(&frame[..cut]), Ok(None));
        }
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_messages(
        said in prop::collection::vec(said(), 1..8),
        mask in any::<[u8; 4]>(),
        reads in prop::collection::vec(1usize..600, 1..40),
    ) {
        let (stream, expected) = conversation(&said, mask);

        let mut whole = MessageReader::new(1 << 20);
        let mut buf = BytesMut::from(&stream[..]);
        let mut got = Vec::new();
        while let Some(message) = whole.next(&mut buf).unwrap() {
            got.push(message);
        }
        prop_assert_eq!(&got, &expected);
        prop_assert!(buf.is_empty());

        // The same stream in reads of the generated sizes (cycled), into a buffer grown the
        // way a session grows it.
        let mut reader = MessageReader::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut fed = 0;
        for size in reads.iter().cycle() {
            if fed == stream.len() {
                break;
            }
            reserve_for_read(&mut buf);
            let n = (*size).min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..fed + n]);
            fed += n;
            while let Some(message) = reader.next(&mut buf).unwrap() {
                got.push(message);
            }
        }
        prop_assert_eq!(&got, &expected);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn masking_round_trips_at_any_length_and_alignment(
        data in prop::collection::vec(any::<u8>(), 0..200),
        mask in any::<[u8; 4]>(),
        offset in 0usize..16,
    ) {
        // The payload may start anywhere in the read buffer, so any alignment occurs.
        let mut buf = vec![0u8; offset];
        buf.extend_from_slice(&data);
        apply_mask(&mut buf[offset..], mask);
        let naive: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        prop_assert!(buf[offset..] == naive[..]);
        apply_mask(&mut buf[offset..], mask);
        prop_assert!(buf[offset..] == data[..]);
    }

    #[test]
    fn server_frames_decode_in_another_implementation(
        opcode in prop::sample::select(vec![OpCode::Text, OpCode::Binary, OpCode::Ping, OpCode::Pong, OpCode::Close]),
        len in payload_len(),
    ) {
        let len = if opcode.is_control() { len % 126 } else { len };
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let frame = encode(opcode, &payload);
        let mut cursor = Cursor::new(&frame[..]);
        let (header, length) = PeerHeader::parse(&mut cursor).unwrap().unwrap();
        prop_assert!(header.is_final);
        prop_assert!(header.mask.is_none(), "server frames are never masked");
        prop_assert_eq!(u8::from(header.opcode), bits(opcode));
        prop_assert_eq!(length, len as u64);
        let start = cursor.position() as usize;
        prop_assert!(frame[start..] == payload[..]);
    }
}
