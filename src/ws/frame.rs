//! RFC 6455 frame headers: parsing what clients send and encoding what the server sends.
//!
//! Server frames are never masked and never fragmented, so encoding is a header in front of the
//! payload. Parsing is strict about what RFC 6455 requires of a client (masking, reserved bits,
//! control-frame rules) because every one of those violations must close the connection with
//! 1002, and being lenient here would make the session's state machine ambiguous.

use bytes::{BufMut, Bytes, BytesMut};

use super::close::WsViolation;

/// The frame types of RFC 6455 §5.2 that this server understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// Continues a fragmented text or binary message.
    Continuation,
    /// First (or only) frame of a UTF-8 text message.
    Text,
    /// First (or only) frame of a binary message.
    Binary,
    /// Close handshake.
    Close,
    /// Heartbeat request; must be answered with a pong carrying the same payload.
    Ping,
    /// Heartbeat answer.
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Control frames (close, ping, pong) may appear between the fragments of a message.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// The largest payload a control frame may carry (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A parsed client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Whether this is the final fragment of its message.
    pub fin: bool,
    /// RSV1: on the first frame of a message, "compressed" (permessage-deflate). Only ever
    /// set when the caller allowed it (see [`parse_header_with`]).
    pub rsv1: bool,
    /// What the frame carries.
    pub opcode: OpCode,
    /// The masking key every client frame must carry.
    pub mask: [u8; 4],
    /// Payload length in bytes, as declared by the header.
    pub payload_len: u64,
    /// Number of bytes the header itself occupies.
    pub header_len: usize,
}

/// Parses a client frame header from the front of `buf`, on a connection without extensions.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole header. No bytes are consumed; the
/// caller advances past `header_len` once the payload is available too.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, WsViolation> {
    parse_header_with(buf, false)
}

/// [`parse_header`], with RSV1 allowed on data frames when `deflate` (permessage-deflate was
/// negotiated). RSV2 and RSV3 are never allowed, nor RSV1 on a control frame (RFC 7692 §6).
/// Whether RSV1 is allowed on a continuation frame is the message reader's to check.
pub fn parse_header_with(buf: &[u8], deflate: bool) -> Result<Option<FrameHeader>, WsViolation> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    let allowed = if deflate && b0 & 0x08 == 0 { 0x40 } else { 0 };
    if b0 & 0x70 & !allowed != 0 {
        return Err(WsViolation::Protocol(if deflate {
            "reserved bits set that no extension uses"
        } else {
            "reserved bits set without an extension"
        }));
    }
    let rsv1 = b0 & 0x40 != 0;
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(WsViolation::Protocol("reserved opcode"))?;
    if b1 & 0x80 == 0 {
        return Err(WsViolation::Protocol("client frames must be masked"));
    }
    let (payload_len, len_bytes) = match b1 & 0x7F {
        126 => match rest {
            [a, b, ..] => (u64::from(u16::from_be_bytes([*a, *b])), 2),
            _ => return Ok(None),
        },
        127 => match rest.get(..8) {
            Some(raw) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(raw);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(WsViolation::Protocol("payload length has its top bit set"));
                }
                (len, 8)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    if opcode.is_control() {
        if !fin {
            return Err(WsViolation::Protocol(
                "control frames must not be fragmented",
            ));
        }
        if payload_len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(WsViolation::Protocol(
                "control frame payload longer than 125 bytes",
            ));
        }
    }
    let Some(key) = rest.get(len_bytes..len_bytes + 4) else {
        return Ok(None);
    };
    let mut mask = [0u8; 4];
    mask.copy_from_slice(key);
    Ok(Some(FrameHeader {
        fin,
        rsv1,
        opcode,
        mask,
        payload_len,
        header_len: 2 + len_bytes + 4,
    }))
}

/// Removes (or applies) a client's XOR mask in place.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    // Word-at-a-time: the mask repeats every 4 bytes, so an 8-byte chunk uses it twice.
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let masked = u64::from_ne_bytes(word) ^ wide;
        chunk.copy_from_slice(&masked.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Appends one unmasked, final server frame to `out`.
pub fn encode_into(out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.put_u8(0x80 | opcode.bits());
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

/// Encodes one server frame into its own buffer, ready to be shared by many outboxes.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    encode_into(&mut out, opcode, payload);
    out.freeze()
}

/// Encodes a close frame carrying `code` and a reason (cut to fit a control frame).
pub fn encode_close(out: &mut BytesMut, code: u16, reason: &str) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_into(out, OpCode::Close, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![first];
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
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        apply_mask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn parses_every_length_form() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let frame = client_frame(0x82, &vec![7u8; len]);
            let header = parse_header(&frame).expect("valid").expect("complete");
            assert_eq!(header.payload_len, len as u64);
            assert_eq!(header.opcode, OpCode::Binary);
            assert!(header.fin);
            assert_eq!(header.header_len + len, frame.len());
        }
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        let frame = client_frame(0x81, &[0u8; 300]);
        for cut in 0..8 {
            assert_eq!(parse_header(&frame[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn rejects_protocol_violations() {
        let cases: [(&[u8], &str); 5] = [
            (&[0xC1, 0x80, 0, 0, 0, 0], "reserved bits"),
            (&[0x83, 0x80, 0, 0, 0, 0], "reserved opcode"),
            (&[0x81, 0x00], "unmasked"),
            (&[0x09, 0x80, 0, 0, 0, 0], "fragmented ping"),
            (&[0x89, 0xFE, 0, 126, 0, 0, 0, 0], "long ping"),
        ];
        for (bytes, what) in cases {
            assert!(
                matches!(parse_header(bytes), Err(WsViolation::Protocol(_))),
                "{what} must be a protocol error"
            );
        }
    }

    #[test]
    fn masking_round_trips_at_every_alignment() {
        let data: Vec<u8> = (0..=255u8).collect();
        for len in 0..20 {
            let mut buf = data[..len].to_vec();
            apply_mask(&mut buf, [9, 8, 7, 6]);
            let expected: Vec<u8> = data[..len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [9, 8, 7, 6][i % 4])
                .collect();
            assert_eq!(buf, expected);
        }
    }

    #[test]
    fn encodes_server_frames_unmasked() {
        assert_eq!(&encode(OpCode::Text, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let big = encode(OpCode::Binary, &[0u8; 70_000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 70_000 + 10);
        let mid = encode(OpCode::Text, &[0u8; 200]);
        assert_eq!(&mid[..4], &[0x81, 126, 0, 200]);
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let mut out = BytesMut::new();
        encode_close(&mut out, 1000, &"é".repeat(100));
        assert_eq!(out[1] as usize, out.len() - 2);
        assert!(out.len() - 2 <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
