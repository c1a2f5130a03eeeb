//! The on-disk record: one publication (or offset marker) of one channel, checksummed.
//!
//! Frame: `len: u32 LE` (body bytes), `crc: u32 LE` (CRC-32C of the body), then the body.
//! Body (little endian): flags `u8`, channel (`u16` length + bytes), epoch (`u8` length +
//! bytes), offset `u64`, wall-clock time in ms `u64`, the channel's history limits (size,
//! TTL in ms or `u64::MAX` for none, max bytes: three `u64`), then optional parts named by
//! the flags: client id (16 bytes), idempotency key (`u16` length + bytes + expiry in wall
//! ms `u64`) and data (`u32` length + bytes). A record without data is an offset marker: the
//! publication was not kept in history (too big, or past the server-wide budget), but its
//! offset was handed out, so after a restart the stream must continue after it.

use std::time::Duration;

use crate::broker::history::HistoryLimits;

const HAS_DATA: u8 = 1;
const HAS_CLIENT: u8 = 2;
const HAS_KEY: u8 = 4;

/// Bytes before a record's body.
pub const FRAME_HEADER: usize = 8;
/// Largest body accepted when reading: anything longer is a damaged length field.
pub const MAX_BODY: usize = 256 << 20;

/// One record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The channel.
    pub channel: String,
    /// The channel stream's epoch this offset belongs to.
    pub epoch: String,
    /// The publication's offset.
    pub offset: u64,
    /// When it was published, in ms since the UNIX epoch (TTLs survive a restart).
    pub time_ms: u64,
    /// The channel's history limits when it was published (applied again after a restart).
    pub limits: HistoryLimits,
    /// The publishing connection.
    pub client_id: Option<uuid::Uuid>,
    /// The idempotency key and when it is forgotten (wall ms).
    pub key: Option<(String, u64)>,
    /// The publication's JSON text; `None` for an offset marker.
    pub data: Option<String>,
}

impl Record {
    /// Appends the framed record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER]);
        let mut flags = 0;
        if self.data.is_some() {
            flags |= HAS_DATA;
        }
        if self.client_id.is_some() {
            flags |= HAS_CLIENT;
        }
        if self.key.is_some() {
            flags |= HAS_KEY;
        }
        out.push(flags);
        // Channel names are at most 255 bytes and epochs 12 (checked by the protocol and
        // `new_epoch`); the casts cannot truncate.
        out.extend_from_slice(&(self.channel.len() as u16).to_le_bytes());
        out.extend_from_slice(self.channel.as_bytes());
        out.push(self.epoch.len() as u8);
        out.extend_from_slice(self.epoch.as_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.time_ms.to_le_bytes());
        out.extend_from_slice(&(self.limits.size as u64).to_le_bytes());
        let ttl = self
            .limits
            .ttl
            .map_or(u64::MAX, |t| t.as_millis().min(u64::MAX as u128 - 1) as u64);
        out.extend_from_slice(&ttl.to_le_bytes());
        out.extend_from_slice(&(self.limits.max_bytes as u64).to_le_bytes());
        if let Some(id) = self.client_id {
            out.extend_from_slice(id.as_bytes());
        }
        if let Some((key, expires)) = &self.key {
            out.extend_from_slice(&(key.len() as u16).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&expires.to_le_bytes());
        }
        if let Some(data) = &self.data {
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data.as_bytes());
        }
        let body_len = (out.len() - start - FRAME_HEADER) as u32;
        let crc = crc32c(&out[start + FRAME_HEADER..]);
        out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes the framed record at the start of `buf`: the record and its framed length,
    /// or why it cannot be trusted.
    pub fn decode(buf: &[u8]) -> Result<(Record, usize), Damage> {
        if buf.len() < FRAME_HEADER {
            return Err(Damage::Truncated);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len > MAX_BODY {
            return Err(Damage::BadLength);
        }
        let Some(body) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
            return Err(Damage::Truncated);
        };
        if crc32c(body) != crc {
            return Err(Damage::Checksum);
        }
        let record = parse(body).ok_or(Damage::Malformed)?;
        Ok((record, FRAME_HEADER + len))
    }
}

/// Why a record was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside the record (a torn write).
    Truncated,
    /// The length field is impossible.
    BadLength,
    /// The body does not match its checksum.
    Checksum,
    /// The checksum matches but the body does not parse (written by an incompatible version).
    Malformed,
    /// Bytes after the zeros that end a preallocated segment's records.
    AfterZeros,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Truncated => "truncated record",
            Self::BadLength => "impossible record length",
            Self::Checksum => "checksum mismatch",
            Self::Malformed => "malformed record",
            Self::AfterZeros => "bytes after the end of the records",
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
    fn string(&mut self, n: usize) -> Option<String> {
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn parse(body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    let flags = r.u8()?;
    let n = r.u16()? as usize;
    let channel = r.string(n)?;
    let n = r.u8()? as usize;
    let epoch = r.string(n)?;
    let offset = r.u64()?;
    let time_ms = r.u64()?;
    let size = usize::try_from(r.u64()?).ok()?;
    let ttl = match r.u64()? {
        u64::MAX => None,
        ms => Some(Duration::from_millis(ms)),
    };
    let max_bytes = usize::try_from(r.u64()?).ok()?;
    let client_id = if flags & HAS_CLIENT != 0 {
        Some(uuid::Uuid::from_slice(r.take(16)?).ok()?)
    } else {
        None
    };
    let key = if flags & HAS_KEY != 0 {
        let n = r.u16()? as usize;
        let key = r.string(n)?;
        Some((key, r.u64()?))
    } else {
        None
    };
    let data = if flags & HAS_DATA != 0 {
        let n = r.u32()? as usize;
        Some(r.string(n)?)
    } else {
        None
    };
    if !r.0.is_empty() || channel.is_empty() || offset == 0 {
        return None;
    }
    Some(Record {
        channel,
        epoch,
        offset,
        time_ms,
        limits: HistoryLimits {
            size,
            ttl,
            max_bytes,
        },
        client_id,
        key,
        data,
    })
}

/// CRC-32C (Castagnoli) of `data`, with the CPU's CRC instruction where it has one
/// (recovery checks every byte of the log at startup).
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            channel: "news:1".into(),
            epoch: "abcdef012345".into(),
            offset: 7,
            time_ms: 1_700_000_000_000,
            limits: HistoryLimits {
                size: 10,
                ttl: Some(Duration::from_secs(60)),
                max_bytes: 1 << 20,
            },
            client_id: Some(uuid::Uuid::from_u128(0x1234)),
            key: Some(("k1".into(), 42)),
            data: Some(r#"{"a":1}"#.into()),
        }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let mut buf = Vec::new();
        sample().encode(&mut buf);
        let (back, used) = Record::decode(&buf).expect("valid");
        assert_eq!(back, sample());
        assert_eq!(used, buf.len());
        let marker = Record {
            data: None,
            key: None,
            client_id: None,
            ..sample()
        };
        let mut m = Vec::new();
        marker.encode(&mut m);
        assert_eq!(Record::decode(&m).expect("valid").0, marker);
        assert_eq!(
            Record::decode(&buf[..buf.len() - 1]),
            Err(Damage::Truncated)
        );
        let mut flipped = buf.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x40;
        assert_eq!(Record::decode(&flipped), Err(Damage::Checksum));
    }
}
