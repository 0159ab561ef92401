//! The durable disk spool behind the Kafka sink: when the broker is unreachable or slow, encoded
//! records wait here, survive a crash or restart of the agent, and are replayed in order; a record
//! leaves the spool only once its delivery was acknowledged ([`Spool::ack`]). Records are opaque
//! `(key, payload)` byte strings: the spool neither knows nor cares that they are Avro. Their
//! on-disk format is in [`format`]; this module is what runs on it.
//!
//! # Durability and what a crash can lose
//!
//! [`Spool::append`] only buffers in memory. [`Spool::flush`] writes the buffer to the segment
//! file: from then on the records survive a crash of the process (kill -9), but not a power loss
//! or kernel crash. [`Spool::sync`] fsyncs the segment and persists acknowledgements: from then on
//! the records survive a power loss too. So a process crash loses the records appended since the
//! last flush, and a machine crash those since the last sync. Acknowledgements since the last sync
//! are lost by any crash: those records are delivered again after the restart (duplicates, never
//! loss). A write cut short by a crash leaves a torn last record at the end of the last segment:
//! [`Spool::open`] truncates it (reported in [`OpenReport::torn_tail`]) and keeps every record
//! before it.
//!
//! # Corruption
//!
//! A segment whose header or a record does not check (bad magic, CRC mismatch, impossible length,
//! a truncated record in a segment that is not the last) is replayed up to that point and skipped
//! from there: the records after it cannot be framed reliably. [`OpenReport::corrupt`] names the
//! file, the byte offset and the reason. Such a file is deleted, like any segment, once its valid
//! records are acknowledged. An unreadable `acks` file is reported the same way and treated as
//! empty, which re-delivers records rather than losing them.
//!
//! # When the spool is full
//!
//! The policy is **drop newest**: an [`Spool::append`] that would take the segment files past
//! `max_bytes` writes nothing and returns [`SpoolError::Full`]; the caller drops that record and
//! counts it. Records already spooled are older and were accepted first; keeping them keeps the
//! replayed stream a gap-free prefix of what was produced. Space comes back when every record of a
//! segment is acknowledged and the segment file is deleted.
mod format;

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

pub use format::MAX_RECORD_BYTES;
use format::{
    ACKS_FILE, ACKS_TMP_FILE, LOCK_FILE, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, covered,
    encode_acks, encode_record, parse_acks, parse_record_header, record_crc, scan_segment,
    segment_header, segment_number, segment_path,
};

/// Largest segment file. Space is reclaimed a whole segment at a time, so a segment should be a
/// small part of the spool (see [`segment_target`]); 8 MiB keeps recovery's per-segment read and
/// the number of files reasonable for spools of a few GiB.
pub const MAX_SEGMENT_BYTES: u64 = 8 << 20;
/// Appends are gathered in memory up to this size before a write system call.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
const READ_BUFFER_BYTES: usize = 256 << 10;
/// Size at which the spool rolls to a new segment: [`MAX_SEGMENT_BYTES`] or an eighth of the
/// spool, whichever is smaller. Space is only freed a whole segment at a time, so with eighths at
/// most about one eighth of `max_bytes` is held by acknowledged records waiting for the rest of
/// their segment.
fn segment_target(max_bytes: u64) -> u64 {
    (max_bytes / 8).min(MAX_SEGMENT_BYTES)
}

/// Why the spool could not do what was asked. Each message names the operation and the file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool: {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("spool: {} is in use by another process (lock file held)", path.display())]
    Locked { path: PathBuf },
    #[error(
        "spool {} is full: {used} bytes used, {needed} more needed, limit {max}; record dropped (drop-newest policy)",
        dir.display()
    )]
    Full {
        dir: PathBuf,
        used: u64,
        needed: u64,
        max: u64,
    },
    #[error("spool {}: record of {len} bytes exceeds the {max}-byte record limit", dir.display())]
    RecordTooLarge { dir: PathBuf, len: u64, max: u64 },
    #[error("spool: {corruption}; the rest of that segment is skipped")]
    Corrupt { corruption: Corruption },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Where one record sits in the spool: opaque to callers, ordered like the records (segment, then
/// offset), and stable across restarts (it names the record's place in an append-only file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpoolId {
    segment: u64,
    offset: u64,
    /// Whole on-disk length, header included: an ack covers exactly `offset..offset + len`.
    len: u64,
}

impl fmt::Display for SpoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {} offset {}", self.segment, self.offset)
    }
}

/// One spooled record handed out for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRecord {
    pub id: SpoolId,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// A file that did not check, where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: String,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is corrupt at byte {}: {}",
            self.path.display(),
            self.offset,
            self.reason
        )
    }
}

/// The incomplete record a crash left at the end of the last segment, removed at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    /// Where the file now ends: the end of the last whole record.
    pub offset: u64,
    pub discarded_bytes: u64,
}

/// What [`Spool::open`] found. The caller logs `corrupt` as errors and `torn_tail` as a warning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Segment files kept.
    pub segments: usize,
    /// Records not yet acknowledged: what will be replayed.
    pub records: u64,
    /// Bytes of those records on disk, headers included.
    pub record_bytes: u64,
    /// Records found already acknowledged (in segments not yet deleted): not replayed.
    pub acked_records: u64,
    /// Bytes of the segment files kept ([`Spool::len_bytes`]).
    pub bytes: u64,
    pub corrupt: Vec<Corruption>,
    pub torn_tail: Option<TornTail>,
}

/// The segment being appended to. Bytes go to `buf` and are written at `flushed` with positioned
/// writes, so a failed or partial write is simply redone at the same offset by the next flush:
/// records accepted by `append` are not lost to a transient error such as a full disk.
struct Writer {
    segment: u64,
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Bytes of the file known written.
    flushed: u64,
}

impl Writer {
    fn flush(&mut self) -> Result<(), SpoolError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.flushed)
            .map_err(io_err("writing records to", &self.path))?;
        self.flushed += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

struct Reader {
    segment: u64,
    pos: u64,
    file: BufReader<File>,
}

struct Segment {
    path: PathBuf,
    /// End of the last valid record (including buffered ones for the segment being written).
    end: u64,
    /// Size of the file on disk, which counts against `max_bytes` (garbage after a corruption
    /// point included).
    disk_bytes: u64,
    records: u64,
    acked_records: u64,
    /// Acknowledged byte ranges, start → end, disjoint and merged when adjacent.
    acked: BTreeMap<u64, u64>,
}

impl Segment {
    /// `offset` if the record there is not acknowledged, else the end of its acknowledged range.
    fn skip_acked(&self, offset: u64) -> u64 {
        match self.acked.range(..=offset).next_back() {
            Some((_, &end)) if end > offset => end,
            _ => offset,
        }
    }

    /// Marks `start..end` acknowledged; false if it already was.
    fn insert_acked(&mut self, start: u64, end: u64) -> bool {
        let mut lo = start;
        let mut hi = end;
        if let Some((&ps, &pe)) = self.acked.range(..=start).next_back() {
            if pe > start {
                return false;
            }
            if pe == start {
                self.acked.remove(&ps);
                lo = ps;
            }
        }
        if let Some((&ns, _)) = self.acked.range(start..).next()
            && ns < end
        {
            // Overlaps a later range without starting inside one: not a record we handed out.
            if lo != start {
                self.acked.insert(lo, start);
            }
            return false;
        }
        if let Some(ne) = self.acked.remove(&end) {
            hi = ne;
        }
        self.acked.insert(lo, hi);
        true
    }

    fn fully_acked(&self) -> bool {
        self.acked_records == self.records
    }
}

/// The spool. Single-threaded by design: the Kafka sink owns it and calls it from one task.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_target: u64,
    segments: BTreeMap<u64, Segment>,
    writer: Option<Writer>,
    reader: Option<Reader>,
    next_segment: u64,
    /// The next record to hand out is at or after this (segment, offset).
    cursor: (u64, u64),
    used_bytes: u64,
    unacked_records: u64,
    acks_dirty: bool,
    /// Held for the lock; released when the spool is dropped.
    _lock: File,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("segments", &self.segments.len())
            .field("used_bytes", &self.used_bytes)
            .field("unacked_records", &self.unacked_records)
            .finish()
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, limited to `max_bytes` of segment files, and
    /// recovers what a previous run left: whole records are kept, a torn last record is truncated,
    /// corrupt segments are replayed up to the corruption point, acknowledged records are skipped
    /// and fully acknowledged segments deleted. Fails only on I/O errors or if another process
    /// holds the directory; corruption is reported, not fatal, so the agent always starts.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, OpenReport), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err("creating spool directory", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked { path: lock_path });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err("locking", &lock_path)(e)),
        }
        let tmp = dir.join(ACKS_TMP_FILE);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing stale", &tmp)(e)),
        }

        let mut report = OpenReport::default();
        let acks_path = dir.join(ACKS_FILE);
        let (acks_next_segment, acks) = match fs::read(&acks_path) {
            Ok(bytes) => match parse_acks(&bytes) {
                Ok(parsed) => parsed,
                Err((offset, reason)) => {
                    report.corrupt.push(Corruption {
                        path: acks_path.clone(),
                        offset,
                        reason,
                    });
                    (0, BTreeMap::new())
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, BTreeMap::new()),
            Err(e) => return Err(io_err("reading acknowledgements", &acks_path)(e)),
        };

        let mut numbers = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("listing spool directory", dir))? {
            let entry = entry.map_err(io_err("listing spool directory", dir))?;
            if let Some(n) = entry.file_name().to_str().and_then(segment_number) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();

        let mut segments = BTreeMap::new();
        let last = numbers.last().copied();
        for &number in &numbers {
            let path = segment_path(dir, number);
            let bytes = fs::read(&path).map_err(io_err("reading segment", &path))?;
            let scan = scan_segment(number, &bytes);
            let mut disk_bytes = bytes.len() as u64;
            if let Some((offset, reason)) = scan.bad {
                if Some(number) == last && scan.incomplete {
                    // A write cut short by a crash: cut the file back to its last whole record so
                    // that appends after a later restart do not follow garbage.
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io_err("opening to truncate torn tail of", &path))?;
                    file.set_len(offset)
                        .map_err(io_err("truncating torn tail of", &path))?;
                    file.sync_all()
                        .map_err(io_err("syncing truncated", &path))?;
                    report.torn_tail = Some(TornTail {
                        path: path.clone(),
                        offset,
                        discarded_bytes: disk_bytes - offset,
                    });
                    disk_bytes = offset;
                } else {
                    report.corrupt.push(Corruption {
                        path: path.clone(),
                        offset,
                        reason,
                    });
                }
            }
            let mut segment = Segment {
                path,
                end: scan.end,
                disk_bytes,
                records: scan.records.len() as u64,
                acked_records: 0,
                acked: BTreeMap::new(),
            };
            if let Some(ranges) = acks.get(&number) {
                for &(start, end) in &scan.records {
                    if covered(ranges, start, end) && segment.insert_acked(start, end) {
                        segment.acked_records += 1;
                    }
                }
            }
            if segment.fully_acked() {
                // Delivered (or nothing left to deliver) but not yet deleted when we stopped.
                remove_file(&segment.path)?;
                continue;
            }
            report.segments += 1;
            report.records += segment.records - segment.acked_records;
            report.acked_records += segment.acked_records;
            report.record_bytes += scan
                .records
                .iter()
                .filter(|&&(s, _)| segment.skip_acked(s) == s)
                .map(|&(s, e)| e - s)
                .sum::<u64>();
            report.bytes += segment.disk_bytes;
            segments.insert(number, segment);
        }

        let next_segment = acks_next_segment.max(last.map_or(0, |n| n + 1));
        let first = segments.keys().next().copied().unwrap_or(next_segment);
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_target: segment_target(max_bytes),
            used_bytes: report.bytes,
            unacked_records: report.records,
            segments,
            writer: None,
            reader: None,
            next_segment,
            cursor: (first, SEGMENT_HEADER_LEN),
            acks_dirty: false,
            _lock: lock,
        };
        Ok((spool, report))
    }

    /// Appends one record after all others. Buffered: see [`Spool::flush`]. If the segment files
    /// would exceed `max_bytes`, nothing is written and [`SpoolError::Full`] is returned — the
    /// drop-newest policy: the caller drops this record and counts it.
    pub fn append(&mut self, key: &[u8], payload: &[u8]) -> Result<(), SpoolError> {
        let body = key.len() as u64 + payload.len() as u64;
        if body > MAX_RECORD_BYTES {
            return Err(SpoolError::RecordTooLarge {
                dir: self.dir.clone(),
                len: body,
                max: MAX_RECORD_BYTES,
            });
        }
        let len = RECORD_HEADER_LEN + body;
        let roll = match &self.writer {
            None => true,
            Some(w) => self
                .segments
                .get(&w.segment)
                .is_none_or(|s| s.end > SEGMENT_HEADER_LEN && s.end + len > self.segment_target),
        };
        let needed = len + if roll { SEGMENT_HEADER_LEN } else { 0 };
        if self.used_bytes + needed > self.max_bytes {
            return Err(SpoolError::Full {
                dir: self.dir.clone(),
                used: self.used_bytes,
                needed,
                max: self.max_bytes,
            });
        }
        if roll {
            self.roll()?;
        }
        let Some(writer) = self.writer.as_mut() else {
            // roll() always leaves a writer.
            return Ok(());
        };
        encode_record(&mut writer.buf, key, payload);
        if let Some(segment) = self.segments.get_mut(&writer.segment) {
            segment.end += len;
            segment.disk_bytes += len;
            segment.records += 1;
        }
        self.used_bytes += len;
        self.unacked_records += 1;
        if writer.buf.len() >= WRITE_BUFFER_BYTES {
            writer.flush()?;
        }
        Ok(())
    }

    /// Writes buffered records to the segment file: they now survive a crash of the process (not
    /// of the machine). Cheap when nothing is buffered; the sink calls it often.
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        match self.writer.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }

    /// Flushes, fsyncs the segment being written and persists acknowledgements: everything
    /// appended and acknowledged so far survives a power loss. Costs an fsync or two; the sink
    /// calls it at most once a second.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if let Some(w) = self.writer.as_mut() {
            w.flush()?;
            w.file
                .sync_data()
                .map_err(io_err("syncing segment", &w.path))?;
        }
        if self.acks_dirty {
            self.persist_acks()?;
        }
        Ok(())
    }

    /// Up to `max` records after the last one handed out, in append order, skipping acknowledged
    /// ones; they stay in the spool until [`Spool::ack`]ed. Empty when all were handed out.
    ///
    /// If a record does not check (the file changed under us since it was written or recovered),
    /// the records before it are returned, then the next call returns [`SpoolError::Corrupt`]
    /// once and skips the rest of that segment; the call after that continues with the next one.
    pub fn next_unsent(&mut self, max: usize) -> Result<Vec<SpoolRecord>, SpoolError> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((&number, segment)) = self.segments.range(self.cursor.0..).next() else {
                break;
            };
            if number != self.cursor.0 {
                self.cursor = (number, SEGMENT_HEADER_LEN);
            }
            let offset = segment.skip_acked(self.cursor.1);
            self.cursor.1 = offset;
            let active = self.writer.as_ref().is_some_and(|w| w.segment == number);
            if offset >= segment.end {
                if active {
                    break;
                }
                self.cursor = (number.saturating_add(1), SEGMENT_HEADER_LEN);
                if number == u64::MAX {
                    break;
                }
                continue;
            }
            if active && let Some(w) = self.writer.as_mut() {
                // The records to read may still be in the write buffer.
                w.flush()?;
            }
            let end = segment.end;
            match self.read_record(number, offset, end) {
                Ok(record) => {
                    self.cursor.1 = offset + record.id.len;
                    out.push(record);
                }
                Err(SpoolError::Corrupt { .. }) if !out.is_empty() => {
                    // Hand out the good records first; the next call meets the bad one again
                    // and reports it.
                    self.reader = None;
                    break;
                }
                Err(SpoolError::Corrupt { corruption }) => {
                    self.reader = None;
                    self.cut_segment(number, offset)?;
                    return Err(SpoolError::Corrupt { corruption });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Marks a record delivered. Acknowledgements may come in any order, and more than once (a
    /// record handed out again after [`Spool::rewind_unacked`]); unknown ids (their segment is
    /// already gone) are ignored. A segment file is deleted as soon as all its records are
    /// acknowledged. Persisted by the next [`Spool::sync`] (or drop).
    pub fn ack(&mut self, id: SpoolId) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.get_mut(&id.segment) else {
            return Ok(());
        };
        if id.offset < SEGMENT_HEADER_LEN || id.offset + id.len > segment.end {
            return Ok(());
        }
        if !segment.insert_acked(id.offset, id.offset + id.len) {
            return Ok(());
        }
        segment.acked_records += 1;
        self.unacked_records -= 1;
        self.acks_dirty = true;
        if segment.fully_acked() {
            // Everything in it was handed out, hence already written: nothing buffered is lost.
            if self
                .writer
                .as_ref()
                .is_some_and(|w| w.segment == id.segment)
            {
                self.writer = None;
            }
            self.delete_segment(id.segment)?;
        }
        Ok(())
    }

    /// Hands out again, from the oldest, every record not yet acknowledged: after a producer
    /// failure the sink cannot know which in-flight records arrived. At-least-once: a record that
    /// was delivered but whose acknowledgement had not come is delivered twice; none is lost.
    pub fn rewind_unacked(&mut self) {
        let first = self
            .segments
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_segment);
        self.cursor = (first, SEGMENT_HEADER_LEN);
    }

    /// Records not yet acknowledged.
    pub fn len_records(&self) -> u64 {
        self.unacked_records
    }

    /// Bytes of the segment files (buffered appends included): what `max_bytes` limits.
    /// Acknowledged records count until their whole segment is deleted.
    pub fn len_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Seals the segment being written (flushed and fsynced: only the last segment may ever hold
    /// a torn record) and starts a new one.
    fn roll(&mut self) -> Result<(), SpoolError> {
        if let Some(mut w) = self.writer.take() {
            w.flush()?;
            w.file
                .sync_data()
                .map_err(io_err("syncing sealed segment", &w.path))?;
            if self
                .segments
                .get(&w.segment)
                .is_some_and(|s| s.records == 0)
            {
                self.delete_segment(w.segment)?;
            }
        }
        let number = self.next_segment;
        let path = segment_path(&self.dir, number);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(io_err("creating segment", &path))?;
        file.write_all_at(&segment_header(number), 0)
            .map_err(io_err("writing header of segment", &path))?;
        // The new name must survive a power loss along with the records synced into it.
        sync_dir(&self.dir)?;
        self.next_segment += 1;
        self.segments.insert(
            number,
            Segment {
                path: path.clone(),
                end: SEGMENT_HEADER_LEN,
                disk_bytes: SEGMENT_HEADER_LEN,
                records: 0,
                acked_records: 0,
                acked: BTreeMap::new(),
            },
        );
        self.used_bytes += SEGMENT_HEADER_LEN;
        self.writer = Some(Writer {
            segment: number,
            path,
            file,
            buf: Vec::with_capacity(WRITE_BUFFER_BYTES),
            flushed: SEGMENT_HEADER_LEN,
        });
        Ok(())
    }

    fn delete_segment(&mut self, number: u64) -> Result<(), SpoolError> {
        if self.reader.as_ref().is_some_and(|r| r.segment == number) {
            self.reader = None;
        }
        if let Some(segment) = self.segments.get(&number) {
            remove_file(&segment.path)?;
        }
        if let Some(segment) = self.segments.remove(&number) {
            self.used_bytes -= segment.disk_bytes;
            self.unacked_records -= segment.records - segment.acked_records;
        }
        Ok(())
    }

    /// A record at `offset` of segment `number` failed to read back: the segment ends there.
    fn cut_segment(&mut self, number: u64, offset: u64) -> Result<(), SpoolError> {
        if self.writer.as_ref().is_some_and(|w| w.segment == number) {
            // Appending after garbage would be lost at the next open: start a new segment.
            self.writer = None;
        }
        let Some(segment) = self.segments.get_mut(&number) else {
            return Ok(());
        };
        let bytes = fs::read(&segment.path).map_err(io_err("reading segment", &segment.path))?;
        let scan = scan_segment(number, &bytes);
        let valid: Vec<(u64, u64)> = scan
            .records
            .into_iter()
            .filter(|&(_, e)| e <= offset)
            .collect();
        let before = segment.records - segment.acked_records;
        let mut acked = BTreeMap::new();
        let mut acked_records = 0;
        for &(s, e) in &valid {
            if segment.skip_acked(s) != s {
                acked.insert(s, e);
                acked_records += 1;
            }
        }
        segment.acked = BTreeMap::new();
        for (s, e) in acked {
            segment.insert_acked(s, e);
        }
        segment.records = valid.len() as u64;
        segment.acked_records = acked_records;
        segment.end = valid.last().map_or(SEGMENT_HEADER_LEN, |&(_, e)| e);
        let after = segment.records - segment.acked_records;
        self.unacked_records -= before - after;
        self.acks_dirty = true;
        if segment.fully_acked() {
            self.delete_segment(number)?;
        }
        Ok(())
    }

    fn read_record(
        &mut self,
        number: u64,
        offset: u64,
        end: u64,
    ) -> Result<SpoolRecord, SpoolError> {
        let path = segment_path(&self.dir, number);
        let reader = match self.reader.take() {
            Some(r) if r.segment == number => r,
            _ => {
                let file = File::open(&path).map_err(io_err("opening segment to replay", &path))?;
                Reader {
                    segment: number,
                    pos: 0,
                    file: BufReader::with_capacity(READ_BUFFER_BYTES, file),
                }
            }
        };
        let reader = self.reader.insert(reader);
        if reader.pos != offset {
            reader
                .file
                .seek(SeekFrom::Start(offset))
                .map_err(io_err("seeking in segment", &path))?;
            reader.pos = offset;
        }
        let corrupt = |reason: String| SpoolError::Corrupt {
            corruption: Corruption {
                path: path.clone(),
                offset,
                reason,
            },
        };
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        reader
            .file
            .read_exact(&mut header)
            .map_err(|e| corrupt(format!("reading record header: {e}")))?;
        let (crc, key_len, payload_len) = parse_record_header(&header);
        let len = RECORD_HEADER_LEN + key_len + payload_len;
        if key_len + payload_len > MAX_RECORD_BYTES || offset + len > end {
            return Err(corrupt(format!(
                "record lengths {key_len}+{payload_len} run past the segment's end {end}"
            )));
        }
        let mut key = vec![0u8; key_len as usize];
        let mut payload = vec![0u8; payload_len as usize];
        reader
            .file
            .read_exact(&mut key)
            .and_then(|()| reader.file.read_exact(&mut payload))
            .map_err(|e| corrupt(format!("reading record: {e}")))?;
        reader.pos = offset + len;
        if record_crc(&header[4..], &key, &payload) != crc {
            return Err(corrupt("record checksum mismatch".to_string()));
        }
        Ok(SpoolRecord {
            id: SpoolId {
                segment: number,
                offset,
                len,
            },
            key,
            payload,
        })
    }

    fn persist_acks(&mut self) -> Result<(), SpoolError> {
        let count = self.segments.values().map(|s| s.acked.len()).sum();
        let ranges = self.segments.iter().flat_map(|(&number, segment)| {
            segment
                .acked
                .iter()
                .map(move |(&start, &end)| (number, start, end))
        });
        let bytes = encode_acks(self.next_segment, count, ranges);
        let tmp = self.dir.join(ACKS_TMP_FILE);
        let path = self.dir.join(ACKS_FILE);
        let mut file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        file.write_all(&bytes).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("renaming acknowledgements into", &path))?;
        sync_dir(&self.dir)?;
        self.acks_dirty = false;
        Ok(())
    }
}

impl Drop for Spool {
    /// Best effort on the way out: buffered records to the file, acknowledgements persisted, so an
    /// orderly stop loses nothing. Not an fsync of the records: call [`Spool::sync`] for that.
    fn drop(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            let _ = w.flush();
        }
        if self.acks_dirty {
            let _ = self.persist_acks();
        }
    }
}

fn remove_file(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("deleting acknowledged segment", path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment() -> Segment {
        Segment {
            path: PathBuf::new(),
            end: 0,
            disk_bytes: 0,
            records: 0,
            acked_records: 0,
            acked: BTreeMap::new(),
        }
    }

    /// The acknowledged-range set against a plain per-record model, for many orders of acks
    /// (with repeats) over records of different lengths.
    #[test]
    fn acked_ranges_match_a_per_record_model() {
        let mut starts = vec![SEGMENT_HEADER_LEN];
        for i in 0..40u64 {
            let last = starts[starts.len() - 1];
            starts.push(last + RECORD_HEADER_LEN + (i * 37) % 50);
        }
        let records: Vec<(u64, u64)> = starts.windows(2).map(|w| (w[0], w[1])).collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let mut seg = segment();
            let mut model = vec![false; records.len()];
            for _ in 0..60 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state % records.len() as u64) as usize;
                let (s, e) = records[i];
                assert_eq!(seg.insert_acked(s, e), !model[i]);
                model[i] = true;
                for (j, &(s, _)) in records.iter().enumerate() {
                    let skipped = seg.skip_acked(s);
                    assert_eq!(skipped != s, model[j]);
                    if model[j] {
                        // Skips to the end of the run of acknowledged records.
                        let run_end = (j..records.len()).take_while(|&k| model[k]).last();
                        assert_eq!(skipped, records[run_end.unwrap_or(j)].1);
                    }
                }
                // Adjacent ranges are merged: one entry per run.
                let runs = (0..records.len())
                    .filter(|&k| model[k] && (k == 0 || !model[k - 1]))
                    .count();
                assert_eq!(seg.acked.len(), runs);
            }
        }
    }
}
