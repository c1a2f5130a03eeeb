//! permessage-deflate (RFC 7692): negotiation, and compressing and inflating whole messages.
//!
//! The server always agrees on `server_no_context_takeover` and `client_no_context_takeover`:
//! every message is compressed and inflated on its own, with a freshly reset stream. That is
//! what makes two things possible:
//!
//! - **No compression state per connection.** Compressors and decompressors (some 300 KB for a
//!   level-1 compressor with a 32 KiB window) live one per worker thread and are reset for each
//!   message, so an idle connection that negotiated deflate costs the same as one that did not.
//! - **One compression per publication.** Without context takeover, the compressed form of a
//!   message is the same for every receiver, so [`SharedFrame`] compresses a publication once,
//!   on first need, and every subscriber's session copies the same bytes.
//!
//! Window sizes: an offer's `server_max_window_bits=N` is accepted and answered with the same
//! `N`. The shared compressed form of a publication uses the full 15-bit window, so a
//! connection that asked for less gets publications uncompressed (RFC 7692 lets a sender leave
//! any message uncompressed), and its direct replies compressed with its own window. zlib's raw
//! deflate cannot produce an 8-bit window (it silently uses 9), so a connection that asked for
//! `server_max_window_bits=8` gets every server message uncompressed: that honours the
//! agreement exactly, where compressing with 9 bits would break it. The client's window needs
//! no answer: the server inflates with 15 bits, which reads any smaller window.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::close::WsViolation;

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The four octets a sync flush ends with; RFC 7692 §7.2.1 removes them from the wire.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest LZ77 window (2^15 bytes), the one the server inflates with.
const MAX_WINDOW: u8 = 15;

/// Server-wide compression settings (`RUSTY_SOCKS_COMPRESSION_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateSettings {
    /// Deflate level, 1-9.
    pub level: u8,
    /// Messages shorter than this are sent uncompressed.
    pub min_size: u32,
}

/// What one connection agreed on: the settings, and the largest window the server may use.
/// `Copy` and 8 bytes: it sits in every deflate connection's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// Deflate level, 1-9.
    pub level: u8,
    /// `server_max_window_bits` as agreed (8-15; 15 when the client did not ask).
    pub window_bits: u8,
    /// Messages shorter than this are sent uncompressed.
    pub min_size: u32,
}

impl Deflate {
    /// Whether this connection can take the shared (15-bit window) form of a publication.
    fn takes_shared(self) -> bool {
        self.window_bits == MAX_WINDOW
    }
}

/// Chooses the first acceptable permessage-deflate offer among the `Sec-WebSocket-Extensions`
/// header values; returns the connection's agreement and the response header value, or `None`
/// when nothing was offered that the server can accept (the connection then goes without).
///
/// Per RFC 7692 §5 and §7.1, an offer with an unknown parameter, a duplicate parameter or an
/// invalid value is declined (the next offer is tried); other extensions are ignored.
pub fn negotiate<'a>(
    values: impl IntoIterator<Item = &'a str>,
    settings: DeflateSettings,
) -> Option<(Deflate, String)> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .find_map(|offer| {
            let mut parts = offer.split(';');
            let name = parts.next()?.trim();
            if !name.eq_ignore_ascii_case(EXTENSION) {
                return None;
            }
            let window = accept_offer(parts)?;
            let mut answer =
                format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
            if let Some(bits) = window {
                answer.push_str(&format!("; server_max_window_bits={bits}"));
            }
            Some((
                Deflate {
                    level: settings.level,
                    window_bits: window.unwrap_or(MAX_WINDOW),
                    min_size: settings.min_size,
                },
                answer,
            ))
        })
}

/// Checks one offer's parameters; `Some(server_max_window_bits if asked)` when acceptable.
fn accept_offer<'a>(params: impl Iterator<Item = &'a str>) -> Option<Option<u8>> {
    let mut seen = [false; 4];
    let mut server_window = None;
    for param in params {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (param.trim(), None),
        };
        let index = match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                server_window = Some(window_bits(value?)?);
                2
            }
            "client_max_window_bits" => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
                3
            }
            // Unknown, or a value where none is allowed: decline this offer.
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
    }
    Some(server_window)
}

/// A quoted-string value loses its quotes (RFC 7692 §7.1: the value may be either form).
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(value),
    }
}

/// A window-bits value: 8-15, decimal digits without a leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    /// This worker thread's compressors, one per (level, window) in use.
    static COMPRESSORS: RefCell<Vec<(u8, u8, Compress)>> = const { RefCell::new(Vec::new()) };
    /// This worker thread's decompressor (15-bit window reads every smaller one).
    static DECOMPRESSOR: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Compressions that panicked (and went out uncompressed); tests check it stays 0.
static COMPRESS_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Compresses one whole message with the thread's reset compressor; `None` when the result
/// would not be smaller (the message then goes uncompressed).
fn compress(payload: &[u8], level: u8, window_bits: u8) -> Option<Vec<u8>> {
    if !(9..=MAX_WINDOW).contains(&window_bits) {
        return None;
    }
    COMPRESSORS.with(|cell| {
        let mut pool = cell.borrow_mut();
        let index = match pool
            .iter()
            .position(|(l, w, _)| *l == level && *w == window_bits)
        {
            Some(i) => i,
            None => {
                let c = Compress::new_with_window_bits(
                    Compression::new(u32::from(level)),
                    false,
                    window_bits,
                );
                pool.push((level, window_bits, c));
                pool.len() - 1
            }
        };
        let compressor = &mut pool[index].2;
        compressor.reset();
        // Room for the worst case up front, so one call always finishes. Level 1
        // (deflate_quick) writes static Huffman codes, up to 9 bits per byte of incompressible
        // input (12.5% more), and zlib-rs 0.6.8 panics there instead of stopping when the
        // output is shorter (Autobahn 12.2/12.5 send such data); the other levels fall back to
        // stored blocks, far below this bound. A compression that still panics is caught below.
        let mut out = Vec::with_capacity(payload.len() + payload.len() / 8 + 128);
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            compressor
                .compress_vec(payload, &mut out, FlushCompress::Sync)
                .is_ok()
                && compressor.total_in() as usize == payload.len()
                && out.len() < out.capacity()
        }));
        match done {
            Ok(true) => {}
            Ok(false) => return None,
            Err(_) => {
                // The compressor's state is unknown after a panic: drop it, send uncompressed.
                tracing::error!("deflate panicked; message sent uncompressed");
                COMPRESS_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                pool.swap_remove(index);
                return None;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        (out.len() < payload.len()).then_some(out)
    })
}

/// Appends one final server data frame to `out`: compressed (RSV1 set) when the connection
/// negotiated deflate, the payload is at least the minimum size, and compressing it helps.
pub fn encode_into(out: &mut BytesMut, text: bool, payload: &[u8], deflate: Option<Deflate>) {
    let opcode = if text {
        super::frame::OpCode::Text
    } else {
        super::frame::OpCode::Binary
    };
    if let Some(d) = deflate
        && payload.len() >= d.min_size as usize
        && let Some(compressed) = compress(payload, d.level, d.window_bits)
    {
        let start = out.len();
        super::frame::encode_into(out, opcode, &compressed);
        out[start] |= 0x40;
        return;
    }
    super::frame::encode_into(out, opcode, payload);
}

/// Where the payload of an encoded server frame starts, and whether it is an unfragmented,
/// uncompressed data frame (the only kind worth compressing).
fn data_payload(frame: &[u8]) -> Option<(bool, usize)> {
    let [b0, b1, ..] = frame else {
        return None;
    };
    let text = match b0 {
        0x81 => true,
        0x82 => false,
        _ => return None,
    };
    let start = match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    (frame.len() >= start).then_some((text, start))
}

/// An encoded server frame shared by every receiver of one publication, with its compressed
/// form built once, by the first receiver that needs it, and shared the same way.
///
/// One allocation per publication besides the frame; cloning is a reference count.
///
/// It may also be a *run*: several frames laid end to end ([`SharedFrame::run`]), which a
/// fan-out hands to each subscriber as one queue entry, one reference count and one slice to
/// write instead of one of each per frame (issue 19: the reference count taken and dropped per
/// delivery, and the queue entry, were a third of the server's own work per delivery).
#[derive(Debug, Clone)]
pub struct SharedFrame(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    plain: Bytes,
    /// The compressed frame, or `None` once it is known that compressing does not help.
    deflated: OnceLock<Option<Bytes>>,
    /// A run's frames, as where each ends in `plain` (empty for a single frame). Boundaries,
    /// not the frames: a run that kept its frames alive would hold every publication twice
    /// for as long as a slow subscriber holds the run.
    ends: Box<[usize]>,
}

impl SharedFrame {
    /// Wraps an encoded frame.
    pub fn new(plain: Bytes) -> Self {
        Self(Arc::new(Shared {
            plain,
            deflated: OnceLock::new(),
            ends: Box::default(),
        }))
    }

    /// The frames of `parts` end to end, sent as they would be one by one (for a
    /// connection that takes the shared compressed form, each compressed on its own). A run
    /// among `parts` counts as its frames: runs do not nest.
    pub fn run(parts: &[SharedFrame]) -> Self {
        let mut plain = BytesMut::with_capacity(parts.iter().map(|p| p.0.plain.len()).sum());
        let mut ends = Vec::with_capacity(parts.len());
        for part in parts {
            let base = plain.len();
            plain.extend_from_slice(&part.0.plain);
            if part.0.ends.is_empty() {
                ends.push(plain.len());
            } else {
                ends.extend(part.0.ends.iter().map(|&end| base + end));
            }
        }
        debug_assert!(ends.len() >= 2, "a run of fewer than two frames");
        Self(Arc::new(Shared {
            plain: plain.freeze(),
            deflated: OnceLock::new(),
            ends: ends.into_boxed_slice(),
        }))
    }

    /// How many frames this is: 1, or a run's length.
    pub fn frames(&self) -> usize {
        self.0.ends.len().max(1)
    }

    /// Each frame, uncopied (a single frame: itself). Off the hot path: a run is written
    /// whole.
    pub fn parts(&self) -> Vec<Bytes> {
        if self.0.ends.is_empty() {
            return vec![self.0.plain.clone()];
        }
        let mut start = 0;
        self.0
            .ends
            .iter()
            .map(|&end| {
                let part = self.0.plain.slice(start..end);
                start = end;
                part
            })
            .collect()
    }

    /// The frame as encoded, uncompressed (a run: its frames end to end).
    pub fn plain(&self) -> &Bytes {
        &self.0.plain
    }

    /// The bytes to send to a connection: the shared compressed form for one that negotiated
    /// deflate with the full window (built now if nobody needed it yet), else the plain frame.
    ///
    /// Inlined: it runs for every delivery, and without compression it is one branch.
    #[inline]
    pub fn for_connection(&self, deflate: Option<Deflate>) -> &[u8] {
        match deflate.filter(|d| d.takes_shared()) {
            None => &self.0.plain,
            Some(d) => self.deflated_for(d),
        }
    }

    /// [`SharedFrame::for_connection`] for a connection that takes the shared compressed form.
    fn deflated_for(&self, d: Deflate) -> &[u8] {
        let plain = &self.0.plain;
        let deflated = self.0.deflated.get_or_init(|| {
            if self.0.ends.is_empty() {
                return deflate_frame(plain, d);
            }
            // A run: each frame compressed as a message of its own, end to end.
            let mut out = BytesMut::new();
            let mut shrank = false;
            let mut start = 0;
            for &end in &self.0.ends {
                let frame = &plain[start..end];
                match deflate_frame(frame, d) {
                    Some(compressed) => {
                        out.extend_from_slice(&compressed);
                        shrank = true;
                    }
                    None => out.extend_from_slice(frame),
                }
                start = end;
            }
            shrank.then(|| out.freeze())
        });
        deflated.as_deref().unwrap_or(plain)
    }
}

/// One encoded data frame compressed as a message of its own (RSV1 set), or `None` when it
/// is not a data frame, is below `min_size`, or does not shrink.
fn deflate_frame(plain: &[u8], d: Deflate) -> Option<Bytes> {
    let (text, start) = data_payload(plain)?;
    if plain.len() - start < d.min_size as usize {
        return None;
    }
    compress(&plain[start..], d.level, MAX_WINDOW).map(|compressed| {
        let mut out = BytesMut::with_capacity(compressed.len() + 10);
        super::frame::encode_into(
            &mut out,
            if text {
                super::frame::OpCode::Text
            } else {
                super::frame::OpCode::Binary
            },
            &compressed,
        );
        out[0] |= 0x40;
        out.freeze()
    })
}

impl From<Bytes> for SharedFrame {
    fn from(plain: Bytes) -> Self {
        Self::new(plain)
    }
}

impl From<&Bytes> for SharedFrame {
    fn from(plain: &Bytes) -> Self {
        Self::new(plain.clone())
    }
}

impl From<&SharedFrame> for SharedFrame {
    fn from(frame: &SharedFrame) -> Self {
        frame.clone()
    }
}

/// Inflates one whole compressed message (its frames' payloads, concatenated) with the
/// thread's reset decompressor. Output stops as soon as it passes `limit`: a small bomb costs
/// at most `limit` bytes before it is refused with 1009. Data that does not inflate is an
/// invalid payload (1007).
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Bytes, WsViolation> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot.get_or_insert_with(|| Decompress::new_with_window_bits(false, MAX_WINDOW));
        d.reset(false);
        let mut out: Vec<u8> = Vec::with_capacity((compressed.len() * 3).max(64).min(limit + 1));
        for input in [compressed, &TAIL[..]] {
            let base = d.total_in();
            loop {
                let consumed = (d.total_in() - base) as usize;
                if consumed == input.len() && out.len() < out.capacity() {
                    break;
                }
                if out.len() == out.capacity() {
                    if out.len() > limit {
                        return Err(WsViolation::TooBig { limit });
                    }
                    let room = out.capacity().max(4096).min(limit + 1 - out.len());
                    out.reserve_exact(room);
                }
                let before = (d.total_in(), d.total_out());
                let status = d
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| WsViolation::BadCompressedData)?;
                if out.len() > limit {
                    return Err(WsViolation::TooBig { limit });
                }
                if status == Status::StreamEnd {
                    // A final block ends the message; anything after it is ignored.
                    return Ok(Bytes::from(out));
                }
                if (d.total_in(), d.total_out()) == before && out.len() < out.capacity() {
                    // No progress with room to spare: the input is truncated mid-block.
                    break;
                }
            }
        }
        Ok(Bytes::from(out))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: DeflateSettings = DeflateSettings {
        level: 1,
        min_size: 0,
    };

    fn offer(values: &[&str]) -> Option<(Deflate, String)> {
        negotiate(values.iter().copied(), SETTINGS)
    }

    #[test]
    fn accepts_a_plain_offer_with_both_no_context_takeovers() {
        let (d, answer) = offer(&["permessage-deflate; client_max_window_bits"]).expect("ok");
        assert_eq!(d.window_bits, 15);
        assert_eq!(
            answer,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn answers_the_asked_server_window() {
        let (d, answer) =
            offer(&["permessage-deflate; server_max_window_bits=\"10\""]).expect("ok");
        assert_eq!(d.window_bits, 10);
        assert!(answer.ends_with("; server_max_window_bits=10"), "{answer}");
        let (d, _) = offer(&["permessage-deflate; server_max_window_bits=8"]).expect("ok");
        assert_eq!(d.window_bits, 8);
    }

    #[test]
    fn declines_bad_offers_and_takes_the_next() {
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=x",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(offer(&[bad]), None, "{bad}");
        }
        let (d, _) = offer(&[
            "permessage-deflate; foo=1, permessage-deflate; server_max_window_bits=12",
            "permessage-deflate",
        ])
        .expect("second offer");
        assert_eq!(d.window_bits, 12);
    }

    #[test]
    fn round_trips_and_compresses_once_per_shared_frame() {
        let text = "{\"hello\":\"world\"} ".repeat(100);
        let frame = SharedFrame::new(super::super::frame::encode(
            super::super::frame::OpCode::Text,
            text.as_bytes(),
        ));
        let full = Deflate {
            level: 1,
            window_bits: 15,
            min_size: 256,
        };
        let d = Some(full);
        let a = frame.for_connection(d);
        let b = frame.clone();
        let b = b.for_connection(d);
        assert_eq!(a.as_ptr(), b.as_ptr(), "one compressed copy");
        assert_eq!(a[0], 0xC1, "FIN, RSV1, text");
        assert!(a.len() < text.len() / 4);
        let start = if a[1] == 126 { 4 } else { 2 };
        let inflated = inflate(&a[start..], 1 << 20).expect("inflates");
        assert_eq!(&inflated[..], text.as_bytes());
        assert_eq!(frame.for_connection(None), frame.plain().as_ref());
        let small = Some(Deflate {
            window_bits: 10,
            ..full
        });
        assert_eq!(frame.for_connection(small), frame.plain().as_ref());
    }

    #[test]
    fn a_bomb_stops_at_the_limit_and_garbage_is_refused() {
        let zeros = vec![0u8; 10 << 20];
        let bomb = compress(&zeros, 9, 15).expect("compresses");
        assert!(bomb.len() < 20 << 10);
        assert_eq!(
            inflate(&bomb, 1 << 20),
            Err(WsViolation::TooBig { limit: 1 << 20 })
        );
        assert_eq!(inflate(&bomb, 10 << 20).map(|m| m.len()), Ok(10 << 20));
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff], 100),
            Err(WsViolation::BadCompressedData)
        );
    }

    #[test]
    fn level_one_never_panics_on_any_mix_of_sizes_and_data() {
        // zlib-rs's level 1 (deflate_quick) writes static Huffman codes, up to 9 bits per byte
        // of incompressible input, and panics instead of stopping when the output buffer is
        // shorter than that; Autobahn 12.2/12.5 send such data. Random, text-like and mixed
        // messages of many sizes go through the same pooled, reset compressors.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..240 {
            let len = [16, 300, 4096, 65_536, 131_072, 200_001][round % 6];
            let kind = (round / 6) % 4;
            let payload: Vec<u8> = (0..len)
                .map(|i| {
                    let r = next();
                    match kind {
                        0 => r as u8,
                        1 => b"some text that compresses "[i % 26],
                        2 if r % 4 == 0 => r as u8,
                        2 => b'a' + (i % 7) as u8,
                        _ => (r % 64) as u8 + 32,
                    }
                })
                .collect();
            for window in [15, 9] {
                if let Some(compressed) = compress(&payload, 1, window) {
                    assert!(compressed.len() < payload.len());
                    assert_eq!(
                        inflate(&compressed, 1 << 20).as_deref(),
                        Ok(&payload[..]),
                        "round {round}"
                    );
                }
            }
        }
        assert_eq!(
            COMPRESS_PANICS.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "the compressor panicked"
        );
    }

    #[test]
    fn small_windows_compress_replies_but_eight_bits_never_compresses() {
        let payload = "abcdefgh".repeat(200);
        let mut out = BytesMut::new();
        let d = Deflate {
            level: 1,
            window_bits: 9,
            min_size: 0,
        };
        encode_into(&mut out, true, payload.as_bytes(), Some(d));
        assert_eq!(out[0], 0xC1);
        out.clear();
        encode_into(
            &mut out,
            true,
            payload.as_bytes(),
            Some(Deflate {
                window_bits: 8,
                ..d
            }),
        );
        assert_eq!(out[0], 0x81);
    }

    #[test]
    fn a_run_is_its_frames_end_to_end_and_compresses_as_they_do_one_by_one() {
        let parts: Vec<SharedFrame> = [&b"a"[..], &[b'x'; 300][..], &[b'y'; 200][..]]
            .into_iter()
            .map(|payload| {
                let mut frame = BytesMut::new();
                encode_into(&mut frame, true, payload, None);
                SharedFrame::from(frame.freeze())
            })
            .collect();
        let run = SharedFrame::run(&parts);
        assert_eq!(run.frames(), 3);
        let each = |deflate| -> Vec<u8> {
            parts
                .iter()
                .flat_map(|p| p.for_connection(deflate).to_vec())
                .collect()
        };
        assert_eq!(run.for_connection(None), &each(None)[..]);
        let full_window = Deflate {
            level: 1,
            window_bits: MAX_WINDOW,
            min_size: 100,
        };
        let shared = Some(full_window);
        let compressed = each(shared);
        assert!(compressed.len() < run.plain().len(), "the long ones shrink");
        assert_eq!(run.for_connection(shared), &compressed[..]);
        let small_window = Some(Deflate {
            window_bits: 10,
            ..full_window
        });
        assert_eq!(run.for_connection(small_window), &run.plain()[..]);
        let plain: Vec<Bytes> = parts.iter().map(|p| p.plain().clone()).collect();
        assert_eq!(run.parts(), plain, "its frames, one by one");
        let nested = SharedFrame::run(&[run.clone(), parts[0].clone()]);
        assert_eq!(nested.frames(), 4, "runs do not nest");
        assert_eq!(nested.parts()[3], plain[0]);
        let short = SharedFrame::run(&[parts[0].clone(), parts[0].clone()]);
        assert_eq!(
            short.for_connection(shared),
            &short.plain()[..],
            "nothing shrank: the plain run"
        );
        assert_eq!(
            nested.for_connection(shared),
            &[&compressed[..], parts[0].plain()].concat()[..]
        );
    }
}
