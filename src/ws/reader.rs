//! Turns the bytes a client sends into whole messages.
//!
//! The reader owns the state that spans frames: a fragmented message being assembled and how
//! much of it is known to be valid UTF-8. Payload bytes are unmasked in place as they arrive,
//! and an uncompressed text message's UTF-8 is checked as each piece arrives, even in the
//! middle of a frame (fail fast: Autobahn|Testsuite 6.4.3/6.4.4 in strict mode). The size limit
//! is checked against the frame header before the payload is buffered, so an oversized
//! message costs nothing to refuse.
//!
//! With permessage-deflate ([`super::deflate`]) a message whose first frame has RSV1 set is
//! compressed: its frames are collected (bounded by the limit plus deflate's framing
//! overhead), then inflated at once with the worker thread's decompressor, which stops as
//! soon as the output passes the limit (1009). Inflating at the end keeps the reader free of
//! decompression state between reads, so a connection costs the same with deflate as without.

use bytes::{Buf, Bytes, BytesMut};

use super::close::{WsViolation, parse_close_payload};
use super::frame::{OpCode, apply_mask, parse_header_with};

/// One complete thing a client said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A text message; the bytes are valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping, whose payload the pong must echo.
    Ping(Bytes),
    /// A pong (only proof of life).
    Pong,
    /// The client started (or answered) the close handshake.
    Close(Option<u16>),
}

/// A fragmented message being assembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    /// RSV1 was set on its first frame: `data` is deflate data, inflated when it is complete.
    compressed: bool,
    data: BytesMut,
}

/// UTF-8 validation that takes a message piece by piece: at most three bytes of an incomplete
/// character are carried from one piece to the next.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8Stream {
    tail: [u8; 4],
    len: u8,
}

impl Utf8Stream {
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), WsViolation> {
        if self.len > 0 {
            let have = usize::from(self.len);
            let need = match self.tail[0] {
                0xF0.. => 4,
                0xE0.. => 3,
                _ => 2,
            };
            let take = (need - have).min(bytes.len());
            self.tail[have..have + take].copy_from_slice(&bytes[..take]);
            self.len += take as u8;
            bytes = &bytes[take..];
            match std::str::from_utf8(&self.tail[..usize::from(self.len)]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_some() => return Err(WsViolation::InvalidUtf8),
                // Still incomplete: every byte of this piece went into the tail.
                Err(_) => return Ok(()),
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(WsViolation::InvalidUtf8),
            Err(e) => {
                let rest = &bytes[e.valid_up_to()..];
                self.tail[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                Ok(())
            }
        }
    }

    /// Ends a message: a character left incomplete makes it invalid.
    fn finish(&mut self) -> Result<(), WsViolation> {
        let complete = self.len == 0;
        *self = Self::default();
        if complete {
            Ok(())
        } else {
            Err(WsViolation::InvalidUtf8)
        }
    }
}

/// Reassembles client frames into messages, enforcing a per-message size limit.
#[derive(Debug)]
pub struct MessageReader {
    /// 32 bits, like the session's settings: the reader lives in every connection's task.
    max_message: u32,
    /// permessage-deflate was negotiated: RSV1 marks compressed messages.
    deflate: bool,
    /// Payload bytes of the frame at the front of the buffer already unmasked in place (and,
    /// for uncompressed text, validated).
    progress: usize,
    utf8: Utf8Stream,
    /// Boxed: only fragmented messages need it, and the reader lives in every connection.
    partial: Option<Box<Partial>>,
    /// Wraps: only ever compared with an earlier reading.
    frames: u32,
}

impl MessageReader {
    /// A reader that refuses messages larger than `max_message` bytes with close code 1009.
    pub fn new(max_message: usize) -> Self {
        Self::with_deflate(max_message, false)
    }

    /// [`MessageReader::new`] on a connection that negotiated permessage-deflate (`deflate`):
    /// the limit then also applies to a compressed message once inflated.
    pub fn with_deflate(max_message: usize, deflate: bool) -> Self {
        Self {
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            deflate,
            progress: 0,
            utf8: Utf8Stream::default(),
            partial: None,
            frames: 0,
        }
    }

    /// Whether the reader holds nothing of a message: no fragmented message under way, no
    /// frame partly unmasked, no character split between fragments. Together with an empty
    /// buffer (a header or the start of a frame waits in the caller's buffer, not here) it is
    /// the state of a fresh reader, so a session may drop an idle one and make a new one when
    /// the client sends again.
    pub fn between_messages(&self) -> bool {
        self.progress == 0 && self.partial.is_none() && self.utf8.len == 0
    }

    /// Complete frames parsed so far (fragments and control frames included), wrapping at
    /// 2^32: compare readings for equality only.
    pub fn frames(&self) -> u32 {
        self.frames
    }

    fn max_message(&self) -> usize {
        self.max_message as usize
    }

    /// The most compressed data a message may bring: the limit, plus what deflate's stored
    /// blocks add to data that does not compress (5 bytes per block of up to 64 KiB).
    fn compressed_limit(&self) -> usize {
        self.max_message()
            .saturating_add(self.max_message() / 1024)
            .saturating_add(64)
    }

    /// Takes the next complete message out of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds no complete frame yet (any partial frame stays in
    /// `buf`, unmasked as far as it arrived). A violation means the connection must be closed
    /// with its close code.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, WsViolation> {
        loop {
            let Some(header) = parse_header_with(buf, self.deflate)? else {
                return Ok(None);
            };
            let (text, compressed) = match header.opcode {
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(WsViolation::Protocol(
                            "new data frame while a fragmented message is open",
                        ));
                    }
                    (header.opcode == OpCode::Text, header.rsv1)
                }
                OpCode::Continuation => {
                    let Some(partial) = &self.partial else {
                        return Err(WsViolation::Protocol(
                            "continuation frame with nothing to continue",
                        ));
                    };
                    if header.rsv1 {
                        return Err(WsViolation::Protocol("RSV1 set on a continuation frame"));
                    }
                    (partial.text, partial.compressed)
                }
                _ => (false, false),
            };
            let already = self.partial.as_ref().map_or(0, |p| p.data.len());
            let limit = if compressed {
                self.compressed_limit()
            } else {
                self.max_message()
            };
            if !header.opcode.is_control()
                && header.payload_len > (limit - already.min(limit)) as u64
            {
                return Err(WsViolation::TooBig {
                    limit: self.max_message(),
                });
            }
            // The limit check above bounds payload_len to usize.
            let len = header.payload_len as usize;
            // Nothing is reserved for the declared length: the buffer grows only with the
            // bytes that arrive (`transport::reserve_for_read`), so a header alone costs the
            // server nothing.
            let arrived = (buf.len() - header.header_len).min(len);
            if arrived > self.progress {
                let piece =
                    &mut buf[header.header_len + self.progress..header.header_len + arrived];
                let m = header.mask;
                let r = self.progress % 4;
                apply_mask(
                    piece,
                    [m[r], m[(r + 1) % 4], m[(r + 2) % 4], m[(r + 3) % 4]],
                );
                if text && !compressed && !header.opcode.is_control() {
                    self.utf8.feed(piece)?;
                }
                self.progress = arrived;
            }
            if arrived < len {
                return Ok(None);
            }
            buf.advance(header.header_len);
            let payload = buf.split_to(len);
            self.progress = 0;
            self.frames = self.frames.wrapping_add(1);
            if let Some(message) = self.on_frame(header.opcode, header.fin, compressed, payload)? {
                return Ok(Some(message));
            }
        }
    }

    fn on_frame(
        &mut self,
        opcode: OpCode,
        fin: bool,
        compressed: bool,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, WsViolation> {
        match opcode {
            OpCode::Ping => Ok(Some(Incoming::Ping(payload.freeze()))),
            OpCode::Pong => Ok(Some(Incoming::Pong)),
            OpCode::Close => parse_close_payload(&payload).map(|code| Some(Incoming::Close(code))),
            OpCode::Text | OpCode::Binary => {
                let text = opcode == OpCode::Text;
                if fin {
                    return self.finish(text, compressed, payload).map(Some);
                }
                self.partial = Some(Box::new(Partial {
                    text,
                    compressed,
                    data: payload,
                }));
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(WsViolation::Protocol(
                        "continuation frame with nothing to continue",
                    ));
                };
                partial.data.extend_from_slice(&payload);
                if fin {
                    let Partial { text, data, .. } = *partial;
                    self.finish(text, compressed, data).map(Some)
                } else {
                    self.partial = Some(partial);
                    Ok(None)
                }
            }
        }
    }

    fn finish(
        &mut self,
        text: bool,
        compressed: bool,
        data: BytesMut,
    ) -> Result<Incoming, WsViolation> {
        let data = if compressed {
            let inflated = super::deflate::inflate(&data, self.max_message())?;
            if text && std::str::from_utf8(&inflated).is_err() {
                return Err(WsViolation::InvalidUtf8);
            }
            inflated
        } else {
            if text {
                self.utf8.finish()?;
            }
            data.freeze()
        };
        Ok(if text {
            Incoming::Text(data)
        } else {
            Incoming::Binary(data)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        apply_mask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    fn read_all(reader: &mut MessageReader, bytes: &[u8]) -> Result<Vec<Incoming>, WsViolation> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = reader.next(&mut buf)? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn assembles_fragments_around_control_frames() {
        let mut bytes = frame(0x01, b"hel");
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x80, b"lo"));
        let got = read_all(&mut MessageReader::new(100), &bytes).expect("valid");
        assert_eq!(
            got,
            vec![
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Text(Bytes::from_static(b"hello"))
            ]
        );
    }

    #[test]
    fn waits_for_split_frames_byte_by_byte() {
        let bytes = frame(0x82, &[5u8; 300]);
        let mut reader = MessageReader::new(1000);
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = reader.next(&mut buf).expect("valid");
            assert_eq!(got.is_some(), i == bytes.len() - 1);
        }
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted() {
        let euro = "€".as_bytes();
        let mut bytes = frame(0x01, &euro[..1]);
        bytes.extend(frame(0x80, &euro[1..]));
        let got = read_all(&mut MessageReader::new(100), &bytes).expect("valid");
        assert_eq!(got, vec![Incoming::Text(Bytes::from_static(euro))]);
    }

    #[test]
    fn invalid_utf8_fails_at_the_first_bad_fragment() {
        let mut reader = MessageReader::new(100);
        let mut buf = BytesMut::from(&frame(0x01, &[0xce, 0xba, 0xff])[..]);
        assert_eq!(reader.next(&mut buf), Err(WsViolation::InvalidUtf8));
        let mut whole = MessageReader::new(100);
        let mut buf = BytesMut::from(&frame(0x81, &[0xc0, 0xaf])[..]);
        assert_eq!(whole.next(&mut buf), Err(WsViolation::InvalidUtf8));
    }

    #[test]
    fn truncated_utf8_at_the_end_is_invalid() {
        let mut bytes = frame(0x01, b"ok");
        bytes.extend(frame(0x80, &[0xe2, 0x82]));
        let got = read_all(&mut MessageReader::new(100), &bytes);
        assert_eq!(got, Err(WsViolation::InvalidUtf8));
    }

    #[test]
    fn size_limit_counts_the_whole_message() {
        let mut reader = MessageReader::new(10);
        assert!(read_all(&mut reader, &frame(0x82, &[0u8; 10])).is_ok());
        assert_eq!(
            read_all(&mut reader, &frame(0x82, &[0u8; 11])),
            Err(WsViolation::TooBig { limit: 10 })
        );
        let mut bytes = frame(0x02, &[0u8; 6]);
        bytes.extend(frame(0x80, &[0u8; 6]));
        assert_eq!(
            read_all(&mut MessageReader::new(10), &bytes),
            Err(WsViolation::TooBig { limit: 10 })
        );
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let bytes = frame(0x82, &[0u8; 200]);
        let mut buf = BytesMut::from(&bytes[..8]);
        assert_eq!(
            MessageReader::new(100).next(&mut buf),
            Err(WsViolation::TooBig { limit: 100 })
        );
    }

    #[test]
    fn a_header_alone_reserves_nothing() {
        // A binary frame declaring 1 MiB (the 8-byte length form), within the limit.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 20).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        let mut buf = BytesMut::from(&header[..]);
        let capacity = buf.capacity();
        assert_eq!(MessageReader::new(1 << 20).next(&mut buf), Ok(None));
        assert_eq!(buf.capacity(), capacity);
        assert_eq!(&buf[..], &header[..]);
    }

    #[test]
    fn fragmentation_errors_are_protocol_errors() {
        let mut bytes = frame(0x01, b"a");
        bytes.extend(frame(0x81, b"b"));
        assert!(matches!(
            read_all(&mut MessageReader::new(100), &bytes),
            Err(WsViolation::Protocol(_))
        ));
        assert!(matches!(
            read_all(&mut MessageReader::new(100), &frame(0x80, b"x")),
            Err(WsViolation::Protocol(_))
        ));
    }

    #[test]
    fn invalid_utf8_fails_before_its_frame_is_complete() {
        // Autobahn 6.4.4: the bad bytes arrive, the rest of the frame does not (yet).
        let bytes = frame(0x81, &[b'a', b'b', 0xf4, 0x90, 0x80, 0x80, b'c', b'd']);
        let mut reader = MessageReader::new(100);
        // A 6-byte header, then "ab".
        let mut buf = BytesMut::from(&bytes[..8]);
        assert_eq!(reader.next(&mut buf), Ok(None), "nothing wrong yet");
        buf.extend_from_slice(&bytes[8..10]);
        assert_eq!(reader.next(&mut buf), Err(WsViolation::InvalidUtf8));
    }

    #[test]
    fn utf8_split_inside_partial_frames_is_accepted() {
        let text = "κόσμε€𝄞".as_bytes();
        let bytes = frame(0x81, text);
        let mut reader = MessageReader::new(100);
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = reader.next(&mut buf).expect("valid");
            assert_eq!(got.is_some(), i == bytes.len() - 1);
            if let Some(m) = got {
                assert_eq!(m, Incoming::Text(Bytes::copy_from_slice(text)));
            }
        }
    }

    fn deflated(payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let d = crate::ws::deflate::Deflate {
            level: 6,
            window_bits: 15,
            min_size: 0,
        };
        crate::ws::deflate::encode_into(&mut out, true, payload, Some(d));
        assert_eq!(out[0] & 0x40, 0x40, "compressed");
        let start = if out[1] == 126 { 4 } else { 2 };
        out[start..].to_vec()
    }

    #[test]
    fn rsv1_needs_the_extension_and_only_starts_a_message() {
        let data = deflated("hello hello hello hello hello".as_bytes());
        assert!(matches!(
            read_all(&mut MessageReader::new(100), &frame(0xC1, &data)),
            Err(WsViolation::Protocol(_))
        ));
        assert_eq!(
            read_all(
                &mut MessageReader::with_deflate(100, true),
                &frame(0xC1, &data)
            ),
            Ok(vec![Incoming::Text(Bytes::from_static(
                b"hello hello hello hello hello"
            ))])
        );
        let mut bytes = frame(0x41, &data[..3]);
        bytes.extend(frame(0xC0, &data[3..]));
        assert!(matches!(
            read_all(&mut MessageReader::with_deflate(100, true), &bytes),
            Err(WsViolation::Protocol(_))
        ));
        let mut bytes = frame(0x41, &data[..3]);
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x80, &data[3..]));
        assert_eq!(
            read_all(&mut MessageReader::with_deflate(100, true), &bytes),
            Ok(vec![
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Text(Bytes::from_static(b"hello hello hello hello hello"))
            ])
        );
        assert!(matches!(
            read_all(
                &mut MessageReader::with_deflate(100, true),
                &frame(0xC9, b"")
            ),
            Err(WsViolation::Protocol(_))
        ));
        assert!(matches!(
            read_all(
                &mut MessageReader::with_deflate(100, true),
                &frame(0xA1, b"x")
            ),
            Err(WsViolation::Protocol(_))
        ));
    }

    #[test]
    fn compressed_messages_are_limited_when_inflated_and_checked() {
        let bomb = deflated(&[b'a'; 5000]);
        assert!(bomb.len() < 100);
        assert_eq!(
            read_all(
                &mut MessageReader::with_deflate(1000, true),
                &frame(0xC1, &bomb)
            ),
            Err(WsViolation::TooBig { limit: 1000 })
        );
        assert_eq!(
            read_all(
                &mut MessageReader::with_deflate(1000, true),
                &frame(0xC1, &[0xff, 0xfe, 0xfd])
            ),
            Err(WsViolation::BadCompressedData)
        );
        let bad_utf8 = deflated(&[0xff; 300]);
        assert_eq!(
            read_all(
                &mut MessageReader::with_deflate(1000, true),
                &frame(0xC1, &bad_utf8)
            ),
            Err(WsViolation::InvalidUtf8)
        );
    }

    #[test]
    fn close_payloads_are_checked() {
        let mut r = MessageReader::new(100);
        assert_eq!(
            read_all(&mut r, &frame(0x88, &[])),
            Ok(vec![Incoming::Close(None)])
        );
        assert_eq!(
            read_all(&mut r, &frame(0x88, &[0x03, 0xe8, b'o', b'k'])),
            Ok(vec![Incoming::Close(Some(1000))])
        );
        assert!(matches!(
            read_all(&mut r, &frame(0x88, &[3])),
            Err(WsViolation::Protocol(_))
        ));
        assert!(matches!(
            read_all(&mut r, &frame(0x88, &[0x03, 0xed])),
            Err(WsViolation::Protocol(_))
        ));
        assert_eq!(
            read_all(&mut r, &frame(0x88, &[0x03, 0xe8, 0xff])),
            Err(WsViolation::InvalidUtf8)
        );
    }
}
