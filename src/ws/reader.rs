//! Turns the bytes a client sends into whole messages.
//!
//! The reader owns the state that spans frames: a fragmented message being assembled and how
//! much of it is known to be valid UTF-8. Invalid UTF-8 is detected as soon as a fragment
//! proves it (fail fast), and the size limit is checked against the frame header before the
//! payload is buffered, so an oversized message costs nothing to refuse.

use bytes::{Buf, Bytes, BytesMut};

use super::close::{WsViolation, parse_close_payload};
use super::frame::{OpCode, apply_mask, parse_header};

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
    data: BytesMut,
    /// Bytes at the front of `data` already checked to be valid UTF-8.
    valid_utf8: usize,
}

/// Reassembles client frames into messages, enforcing a per-message size limit.
#[derive(Debug)]
pub struct MessageReader {
    max_message: usize,
    /// Boxed: only fragmented messages need it, and the reader lives in every connection.
    partial: Option<Box<Partial>>,
    frames: u64,
}

impl MessageReader {
    /// A reader that refuses messages larger than `max_message` bytes with close code 1009.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            partial: None,
            frames: 0,
        }
    }

    /// Complete frames parsed so far (fragments and control frames included).
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Takes the next complete message out of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds no complete frame yet (any partial frame stays in
    /// `buf`). A violation means the connection must be closed with its close code.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, WsViolation> {
        loop {
            let Some(header) = parse_header(buf)? else {
                return Ok(None);
            };
            let already = self.partial.as_ref().map_or(0, |p| p.data.len());
            if !header.opcode.is_control()
                && header.payload_len > (self.max_message - already.min(self.max_message)) as u64
            {
                return Err(WsViolation::TooBig {
                    limit: self.max_message,
                });
            }
            // The limit check above bounds payload_len to usize.
            let len = header.payload_len as usize;
            if buf.len() < header.header_len + len {
                // Nothing is reserved for the declared length: the buffer grows only with the
                // bytes that arrive (`transport::reserve_for_read`), so a header alone costs
                // the server nothing.
                return Ok(None);
            }
            buf.advance(header.header_len);
            let mut payload = buf.split_to(len);
            apply_mask(&mut payload, header.mask);
            self.frames += 1;
            if let Some(message) = self.on_frame(header.opcode, header.fin, payload)? {
                return Ok(Some(message));
            }
        }
    }

    fn on_frame(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, WsViolation> {
        match opcode {
            OpCode::Ping => Ok(Some(Incoming::Ping(payload.freeze()))),
            OpCode::Pong => Ok(Some(Incoming::Pong)),
            OpCode::Close => parse_close_payload(&payload).map(|code| Some(Incoming::Close(code))),
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(WsViolation::Protocol(
                        "new data frame while a fragmented message is open",
                    ));
                }
                let text = opcode == OpCode::Text;
                if fin {
                    return finish(text, payload).map(Some);
                }
                let mut partial = Box::new(Partial {
                    text,
                    data: payload,
                    valid_utf8: 0,
                });
                check_utf8_prefix(&mut partial)?;
                self.partial = Some(partial);
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(WsViolation::Protocol(
                        "continuation frame with nothing to continue",
                    ));
                };
                partial.data.extend_from_slice(&payload);
                check_utf8_prefix(&mut partial)?;
                if fin {
                    let Partial { text, data, .. } = *partial;
                    finish(text, data).map(Some)
                } else {
                    self.partial = Some(partial);
                    Ok(None)
                }
            }
        }
    }
}

/// Validates the not-yet-checked tail of a fragmented text message; an incomplete character at
/// the end is fine (the next fragment may complete it), an impossible sequence is not.
fn check_utf8_prefix(partial: &mut Partial) -> Result<(), WsViolation> {
    if !partial.text {
        return Ok(());
    }
    match std::str::from_utf8(&partial.data[partial.valid_utf8..]) {
        Ok(_) => partial.valid_utf8 = partial.data.len(),
        Err(e) if e.error_len().is_some() => return Err(WsViolation::InvalidUtf8),
        Err(e) => partial.valid_utf8 += e.valid_up_to(),
    }
    Ok(())
}

fn finish(text: bool, data: BytesMut) -> Result<Incoming, WsViolation> {
    if text {
        if std::str::from_utf8(&data).is_err() {
            return Err(WsViolation::InvalidUtf8);
        }
        Ok(Incoming::Text(data.freeze()))
    } else {
        Ok(Incoming::Binary(data.freeze()))
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
