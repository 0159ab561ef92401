//! The spool's on-disk format: what the bytes of its files are, how they are written and how
//! they are checked when read back. The runtime that decides when to write, roll, replay and
//! delete them is the parent module.
//!
//! # Version 1, all integers little-endian
//!
//! A spool directory holds numbered segment files, an acknowledgement file and a lock file:
//!
//! - `NNNNNNNNNNNNNNNNNNNN.seg` (20 decimal digits, the segment number; numbers only grow, so
//!   name order is append order). A 16-byte header — magic `FLSPSG`, version `u16`, segment number
//!   `u64` (must match the name) — then records back to back, each a 12-byte header — CRC-32
//!   (`crc32fast`, IEEE) `u32` over the next 8 bytes *and* the key and payload, key length `u32`,
//!   payload length `u32` — followed by the key and the payload. The CRC covers the lengths so
//!   that a run of zeros (what a file system may leave after a power loss) never parses as a valid
//!   empty record. Segments are append-only: a record is never rewritten in place.
//! - `acks`: which records of the remaining segments were acknowledged. Magic `FLSPAK`, version
//!   `u16`, next segment number `u64`, entry count `u32`, then per entry segment `u64`, start
//!   offset `u64`, end offset `u64` (a half-open byte range of whole acknowledged records), then a
//!   CRC-32 of everything before it. It is rewritten whole to `acks.tmp`, fsynced and renamed over
//!   `acks` ([`Spool::sync`](super::Spool::sync)), so a crash leaves either the old or the new file, never a mix.
//!   Ranges rather than a per-segment "acknowledged up to" mark because Kafka delivery reports
//!   arrive out of order: a mark alone would re-deliver every record acknowledged past a gap.
//!   Ranges rather than one entry per record because reports are nearly in order, so the set
//!   stays a handful of ranges however many records it covers. The next segment number is kept so
//!   that a number is never reused while an old entry could still name it.
//! - `lock`: held with an exclusive file lock (`flock`) while a [`Spool`](super::Spool) is open, so two agents
//!   never share a directory. A child process forked meanwhile shares the lock until its exec
//!   closes the (close-on-exec) descriptor: a reopen in that instant sees [`SpoolError::Locked`](super::SpoolError::Locked).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

pub(super) const SEGMENT_MAGIC: &[u8; 6] = b"FLSPSG";
pub(super) const ACKS_MAGIC: &[u8; 6] = b"FLSPAK";
pub(super) const FORMAT_VERSION: u16 = 1;
/// Magic (6) + version (2) + segment number (8).
pub(super) const SEGMENT_HEADER_LEN: u64 = 16;
/// CRC (4) + key length (4) + payload length (4).
pub(super) const RECORD_HEADER_LEN: u64 = 12;

/// Largest key + payload of one record. Flow records are ~100 bytes; anything near this is a bug,
/// and a length field above it is how recovery recognises a garbled header.
pub const MAX_RECORD_BYTES: u64 = 16 << 20;

pub(super) const ACKS_FILE: &str = "acks";
pub(super) const ACKS_TMP_FILE: &str = "acks.tmp";
pub(super) const LOCK_FILE: &str = "lock";
pub(super) const SEGMENT_SUFFIX: &str = ".seg";

/// The header that starts segment `number`'s file.
pub(super) fn segment_header(number: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..6].copy_from_slice(SEGMENT_MAGIC);
    header[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[8..].copy_from_slice(&number.to_le_bytes());
    header
}

/// Appends one record (header, key, payload) to `buf`. The caller has checked the record limit
/// ([`MAX_RECORD_BYTES`]), so both lengths fit their `u32`.
pub(super) fn encode_record(buf: &mut Vec<u8>, key: &[u8], payload: &[u8]) {
    debug_assert!(key.len() as u64 + payload.len() as u64 <= MAX_RECORD_BYTES);
    let mut lens = [0u8; 8];
    lens[..4].copy_from_slice(&(key.len() as u32).to_le_bytes());
    lens[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&record_crc(&lens, key, payload).to_le_bytes());
    buf.extend_from_slice(&lens);
    buf.extend_from_slice(key);
    buf.extend_from_slice(payload);
}

/// The CRC of a record: over its two lengths (`lens`, the header's last 8 bytes), key and payload.
pub(super) fn record_crc(lens: &[u8], key: &[u8], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(lens);
    crc.update(key);
    crc.update(payload);
    crc.finalize()
}

/// The `acks` file for `ranges` (segment, start, end), in that order.
pub(super) fn encode_acks(
    next_segment: u64,
    count: usize,
    ranges: impl Iterator<Item = (u64, u64, u64)>,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(ACKS_MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&next_segment.to_le_bytes());
    bytes.extend_from_slice(&(count as u32).to_le_bytes());
    for (number, start, end) in ranges {
        bytes.extend_from_slice(&number.to_le_bytes());
        bytes.extend_from_slice(&start.to_le_bytes());
        bytes.extend_from_slice(&end.to_le_bytes());
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

pub(super) fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}{SEGMENT_SUFFIX}"))
}

/// The segment number a file name gives, if it is a segment's (exactly 20 digits and the suffix).
pub(super) fn segment_number(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
        stem.parse().ok()
    } else {
        None
    }
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(a)
}

/// (crc, key length, payload length).
pub(super) fn parse_record_header(header: &[u8; RECORD_HEADER_LEN as usize]) -> (u32, u64, u64) {
    (
        le_u32(&header[0..]),
        u64::from(le_u32(&header[4..])),
        u64::from(le_u32(&header[8..])),
    )
}

pub(super) struct Scan {
    /// (start, end) of each valid record, in order.
    pub(super) records: Vec<(u64, u64)>,
    /// End of the last valid record (the header's end if none).
    pub(super) end: u64,
    /// First problem: offset and reason.
    pub(super) bad: Option<(u64, String)>,
    /// The problem is that the file ends inside a record (or its header): what a crash leaves.
    pub(super) incomplete: bool,
}

/// Frames and checks every record of a segment file's bytes.
pub(super) fn scan_segment(number: u64, bytes: &[u8]) -> Scan {
    let mut scan = Scan {
        records: Vec::new(),
        end: SEGMENT_HEADER_LEN,
        bad: None,
        incomplete: false,
    };
    let total = bytes.len() as u64;
    if total < SEGMENT_HEADER_LEN {
        scan.end = 0;
        scan.bad = Some((0, format!("segment header incomplete ({total} bytes)")));
        scan.incomplete = true;
        return scan;
    }
    if &bytes[..6] != SEGMENT_MAGIC {
        scan.bad = Some((0, "bad segment magic".to_string()));
        return scan;
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    if version != FORMAT_VERSION {
        scan.bad = Some((0, format!("unsupported segment version {version}")));
        return scan;
    }
    let header_number = le_u64(&bytes[8..]);
    if header_number != number {
        scan.bad = Some((
            0,
            format!("header names segment {header_number}, file name says {number}"),
        ));
        return scan;
    }
    let mut offset = SEGMENT_HEADER_LEN;
    while offset < total {
        let rest = &bytes[offset as usize..];
        if (rest.len() as u64) < RECORD_HEADER_LEN {
            scan.bad = Some((
                offset,
                format!("record header cut short ({} bytes)", rest.len()),
            ));
            scan.incomplete = true;
            break;
        }
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        header.copy_from_slice(&rest[..RECORD_HEADER_LEN as usize]);
        let (crc, key_len, payload_len) = parse_record_header(&header);
        if key_len + payload_len > MAX_RECORD_BYTES {
            scan.bad = Some((
                offset,
                format!("record lengths {key_len}+{payload_len} exceed the record limit"),
            ));
            break;
        }
        let len = RECORD_HEADER_LEN + key_len + payload_len;
        if offset + len > total {
            scan.bad = Some((
                offset,
                format!(
                    "record of {len} bytes cut short by the end of the file ({} bytes left)",
                    total - offset
                ),
            ));
            scan.incomplete = true;
            break;
        }
        let record = &rest[..len as usize];
        if crc32fast::hash(&record[4..]) != crc {
            scan.bad = Some((offset, "record checksum mismatch".to_string()));
            break;
        }
        scan.records.push((offset, offset + len));
        offset += len;
    }
    scan.end = offset.min(total);
    if scan.bad.is_some() {
        scan.end = scan.records.last().map_or(SEGMENT_HEADER_LEN, |&(_, e)| e);
    }
    scan
}

/// Whether `start..end` lies inside one of `ranges` (sorted, disjoint).
pub(super) fn covered(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|&(s, _)| s <= start);
    i > 0 && ranges[i - 1].1 >= end
}

pub(super) type AckSets = BTreeMap<u64, Vec<(u64, u64)>>;

/// Parses the `acks` file: (next segment number, ranges per segment), or (offset, reason).
pub(super) fn parse_acks(bytes: &[u8]) -> Result<(u64, AckSets), (u64, String)> {
    const FIXED: usize = 6 + 2 + 8 + 4;
    if bytes.len() < FIXED + 4 {
        return Err((0, format!("file too short ({} bytes)", bytes.len())));
    }
    if &bytes[..6] != ACKS_MAGIC {
        return Err((0, "bad magic".to_string()));
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    if version != FORMAT_VERSION {
        return Err((6, format!("unsupported version {version}")));
    }
    let body = bytes.len() - 4;
    if crc32fast::hash(&bytes[..body]) != le_u32(&bytes[body..]) {
        return Err((body as u64, "checksum mismatch".to_string()));
    }
    let next_segment = le_u64(&bytes[8..]);
    let count = le_u32(&bytes[16..]) as usize;
    if count.checked_mul(24).and_then(|n| n.checked_add(FIXED)) != Some(body) {
        return Err((16, format!("{count} entries do not fill {body} bytes")));
    }
    let mut sets: AckSets = BTreeMap::new();
    for entry in bytes[FIXED..body].chunks_exact(24) {
        let range = (le_u64(&entry[8..]), le_u64(&entry[16..]));
        sets.entry(le_u64(entry)).or_default().push(range);
    }
    for ranges in sets.values_mut() {
        ranges.sort_unstable();
    }
    Ok((next_segment, sets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_file_round_trip_and_damage() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(ACKS_MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&9u64.to_le_bytes());
        bytes.extend_from_slice(&2u32.to_le_bytes());
        for (seg, s, e) in [(4u64, 16u64, 100u64), (4, 200, 300)] {
            bytes.extend_from_slice(&seg.to_le_bytes());
            bytes.extend_from_slice(&s.to_le_bytes());
            bytes.extend_from_slice(&e.to_le_bytes());
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let (next, sets) = parse_acks(&bytes).unwrap();
        assert_eq!(next, 9);
        assert_eq!(sets.get(&4), Some(&vec![(16, 100), (200, 300)]));
        assert!(covered(&sets[&4], 200, 250) && !covered(&sets[&4], 100, 120));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(parse_acks(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(parse_acks(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn zeros_never_parse_as_a_record() {
        // What a file system may leave after a power loss: the CRC covers the lengths.
        let mut bytes = vec![0u8; 64];
        bytes[..6].copy_from_slice(SEGMENT_MAGIC);
        bytes[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let scan = scan_segment(0, &bytes);
        assert!(scan.records.is_empty());
        assert_eq!(scan.bad.map(|(offset, _)| offset), Some(SEGMENT_HEADER_LEN));
    }

    #[test]
    fn acks_written_are_acks_read() {
        let ranges = [(4u64, 16u64, 100u64), (4, 200, 300), (7, 16, 40)];
        let bytes = encode_acks(9, ranges.len(), ranges.into_iter());
        let (next, sets) = parse_acks(&bytes).unwrap();
        assert_eq!(next, 9);
        assert_eq!(sets.get(&4), Some(&vec![(16, 100), (200, 300)]));
        assert_eq!(sets.get(&7), Some(&vec![(16, 40)]));
    }

    #[test]
    fn records_written_are_records_scanned() {
        let mut bytes = segment_header(3).to_vec();
        encode_record(&mut bytes, b"key", b"payload");
        encode_record(&mut bytes, b"", b"");
        let scan = scan_segment(3, &bytes);
        assert_eq!(scan.records, vec![(16, 16 + 12 + 10), (38, 38 + 12)]);
        assert_eq!((scan.end, scan.bad), (50, None));
        assert_eq!(scan_segment(4, &bytes).bad.map(|(at, _)| at), Some(0));
        assert_eq!(segment_number("00000000000000000003.seg"), Some(3));
        assert_eq!(segment_number("3.seg"), None);
        assert_eq!(segment_number("acks"), None);
    }
}
