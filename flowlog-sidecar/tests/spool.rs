//! The disk spool against real files: each test works in its own temporary directory (removed
//! afterwards) and checks what it reads back against values it computed itself — record contents
//! from a seeded generator, file sizes and offsets from the documented on-disk format.
use std::{
    env, fs,
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flowlog_sidecar::spool::{Spool, SpoolError, SpoolRecord};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

/// From the format in the module documentation, not from the code.
const SEGMENT_HEADER: u64 = 16;
const RECORD_HEADER: u64 = 12;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = env::temp_dir().join(format!(
            "flowlog-spool-{name}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    key: Vec<u8>,
    payload: Vec<u8>,
}

impl Rec {
    /// Record `i` with the given sizes; contents depend on `i` so misplaced records show.
    fn new(i: u64, key_len: usize, payload_len: usize) -> Self {
        let mut key = i.to_le_bytes().to_vec();
        key.resize(key_len, (i % 251) as u8);
        key.truncate(key_len);
        let payload = (0..payload_len)
            .map(|j| (i as usize * 31 + j * 7) as u8)
            .collect();
        Rec { key, payload }
    }

    fn disk_len(&self) -> u64 {
        RECORD_HEADER + self.key.len() as u64 + self.payload.len() as u64
    }
}

fn random_records(seed: u64, n: u64, max_key: usize, max_payload: usize) -> Vec<Rec> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let k = rng.random_range(0..=max_key);
            let p = rng.random_range(0..=max_payload);
            Rec::new(i, k, p)
        })
        .collect()
}

fn fixed_records(n: u64, key_len: usize, payload_len: usize) -> Vec<Rec> {
    (0..n).map(|i| Rec::new(i, key_len, payload_len)).collect()
}

fn append_all(spool: &mut Spool, recs: &[Rec]) {
    for r in recs {
        spool.append(&r.key, &r.payload).unwrap();
    }
}

fn drain(spool: &mut Spool) -> Vec<SpoolRecord> {
    let mut out = Vec::new();
    loop {
        let batch = spool.next_unsent(64).unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

fn contents(records: &[SpoolRecord]) -> Vec<Rec> {
    records
        .iter()
        .map(|r| Rec {
            key: r.key.clone(),
            payload: r.payload.clone(),
        })
        .collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

fn disk_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

/// Opens, waiting out a lock held for a moment by another test's child process: a fork copies
/// every open file, our lock file included, until the child's exec closes it (close-on-exec).
fn open(dir: &Path, max: u64) -> (Spool, flowlog_sidecar::spool::OpenReport) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Spool::open(dir, max) {
            Err(SpoolError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            result => return result.unwrap(),
        }
    }
}

#[test]
fn round_trip_in_order_across_segment_rolls() {
    let tmp = TempDir::new("roundtrip");
    // 8 MiB: segments roll at 1 MiB; ~4.5 MB of records make five segments.
    let max = 8 << 20;
    let recs = random_records(1, 3000, 40, 3000);
    let (mut spool, report) = open(tmp.path(), max);
    assert_eq!(report.records, 0);
    let mut got = Vec::new();
    for (i, chunk) in recs.chunks(100).enumerate() {
        append_all(&mut spool, chunk);
        // Read while writing, in batches of odd sizes, including from the segment being written.
        got.extend(spool.next_unsent(37 + i % 50).unwrap());
    }
    got.extend(drain(&mut spool));
    assert_eq!(contents(&got), recs);
    assert!(got.windows(2).all(|w| w[0].id < w[1].id), "ids ordered");
    assert_eq!(spool.len_records(), 3000);
    spool.flush().unwrap();
    let segments = segment_files(tmp.path()).len() as u64;
    assert!(segments >= 4, "only {segments} segments");
    let record_bytes: u64 = recs.iter().map(Rec::disk_len).sum();
    assert_eq!(spool.len_bytes(), segments * SEGMENT_HEADER + record_bytes);
    assert_eq!(disk_bytes(tmp.path()), spool.len_bytes());
    drop(spool);

    // Nothing acknowledged: a restart replays everything, in order.
    let (mut spool, report) = open(tmp.path(), max);
    assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
    assert_eq!(report.torn_tail, None);
    assert_eq!(report.records, 3000);
    assert_eq!(report.record_bytes, record_bytes);
    assert_eq!(report.segments as u64, segments);
    let again = drain(&mut spool);
    assert_eq!(contents(&again), recs);
    assert_eq!(
        again.iter().map(|r| r.id).collect::<Vec<_>>(),
        got.iter().map(|r| r.id).collect::<Vec<_>>(),
        "ids are stable across restarts"
    );
}

#[test]
fn out_of_order_acks_delete_whole_segments_and_survive_restart() {
    let tmp = TempDir::new("acks");
    // 64 KiB: segments roll at 8 KiB; 512-byte records → 15 per segment (16 + 15 × 512 = 7696).
    let max = 64 << 10;
    let per_segment = ((max / 8 - SEGMENT_HEADER) / 512) as usize;
    assert_eq!(per_segment, 15);
    let recs = fixed_records(100, 4, 512 - 12 - 4);
    let (mut spool, _) = open(tmp.path(), max);
    append_all(&mut spool, &recs);
    let handed = drain(&mut spool);
    assert_eq!(contents(&handed), recs);
    assert_eq!(segment_files(tmp.path()).len(), 7);

    let keep = [3usize, 40, 41, 77, 99];
    let mut order: Vec<usize> = (0..100).filter(|i| !keep.contains(i)).collect();
    order.shuffle(&mut StdRng::seed_from_u64(2));
    let mut acked = [false; 100];
    for (n, &i) in order.iter().enumerate() {
        spool.ack(handed[i].id).unwrap();
        acked[i] = true;
        // A segment file exists exactly while one of its records is unacknowledged.
        let live = acked
            .chunks(per_segment)
            .filter(|seg| seg.iter().any(|a| !a))
            .count();
        assert_eq!(segment_files(tmp.path()).len(), live, "after {n} acks");
        assert_eq!(spool.len_records(), 100 - n as u64 - 1);
    }
    // Acknowledging twice (a duplicate delivery report) changes nothing.
    spool.ack(handed[0].id).unwrap();
    assert_eq!(spool.len_records(), keep.len() as u64);
    assert_eq!(spool.next_unsent(10).unwrap(), vec![]);
    spool.sync().unwrap();
    drop(spool);

    let (mut spool, report) = open(tmp.path(), max);
    assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
    assert_eq!(report.records, keep.len() as u64);
    // Kept segments 0, 2, 5, 6 hold 15 + 15 + 15 + 10 records.
    assert_eq!(report.segments, 4);
    assert_eq!(report.acked_records, 55 - keep.len() as u64);
    let replay = drain(&mut spool);
    let want: Vec<Rec> = keep.iter().map(|&i| recs[i].clone()).collect();
    assert_eq!(contents(&replay), want);

    // Acks made without an explicit sync are persisted by an orderly drop.
    spool.ack(replay[1].id).unwrap();
    drop(spool);
    let (mut spool, report) = open(tmp.path(), max);
    assert_eq!(report.records, keep.len() as u64 - 1);
    let replay = drain(&mut spool);
    let want: Vec<Rec> = [3usize, 41, 77, 99]
        .iter()
        .map(|&i| recs[i].clone())
        .collect();
    assert_eq!(contents(&replay), want);

    // Appends after the restart go after the replayed ones.
    let more = Rec::new(1000, 4, 20);
    spool.append(&more.key, &more.payload).unwrap();
    let next = spool.next_unsent(10).unwrap();
    assert_eq!(contents(&next), vec![more]);
    assert!(next[0].id > replay[3].id);
}

#[test]
fn full_spool_writes_nothing_until_acks_free_a_segment() {
    let tmp = TempDir::new("full");
    // 4096 bytes: segments roll at 512; 100-byte records → 4 per segment (416 bytes).
    let max = 4096;
    let (mut spool, _) = open(tmp.path(), max);
    let recs = fixed_records(100, 4, 100 - 12 - 4);
    // 9 full segments (3744 bytes), then a 10th with room for 3 records: 16 + 300 → 4060.
    let fits = 9 * 4 + 3;
    append_all(&mut spool, &recs[..fits]);
    spool.flush().unwrap();
    let files = segment_files(tmp.path());
    assert_eq!(disk_bytes(tmp.path()), 4060);
    match spool.append(&recs[fits].key, &recs[fits].payload) {
        Err(SpoolError::Full {
            used, needed, max, ..
        }) => assert_eq!((used, needed, max), (4060, 100, 4096)),
        other => panic!("expected Full, got {other:?}"),
    }
    spool.flush().unwrap();
    assert_eq!(segment_files(tmp.path()), files, "no segment created");
    assert_eq!(disk_bytes(tmp.path()), 4060, "nothing written");
    assert_eq!(spool.len_bytes(), 4060);
    assert_eq!(spool.len_records(), fits as u64);

    // Acks inside a segment free nothing until the whole segment is acknowledged.
    let handed = spool.next_unsent(4).unwrap();
    for r in &handed[..3] {
        spool.ack(r.id).unwrap();
    }
    assert!(matches!(
        spool.append(&recs[fits].key, &recs[fits].payload),
        Err(SpoolError::Full { .. })
    ));
    spool.ack(handed[3].id).unwrap();
    assert_eq!(spool.len_bytes(), 4060 - 416);
    // 416 bytes freed: the last record of the 10th segment, then a new one with three.
    let mut appended = 0;
    while spool
        .append(&recs[fits + appended].key, &recs[fits + appended].payload)
        .is_ok()
    {
        appended += 1;
    }
    assert_eq!(appended, 4);
    assert_eq!(spool.len_bytes(), 4060);
    drop(spool);

    // The rejected records never appear; the accepted ones all do, in order.
    let (mut spool, report) = open(tmp.path(), max);
    assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
    assert_eq!(contents(&drain(&mut spool)), recs[4..fits + 4].to_vec());
    assert!(spool.len_bytes() <= max);
}

#[test]
fn torn_last_record_is_cut_at_every_byte_and_earlier_records_survive() {
    let src = TempDir::new("torn-src");
    let max = 1 << 20;
    let mut recs = random_records(3, 20, 16, 200);
    recs.push(Rec::new(20, 3, 50));
    {
        let (mut spool, _) = open(src.path(), max);
        append_all(&mut spool, &recs);
        spool.sync().unwrap();
    }
    let files = segment_files(src.path());
    assert_eq!(files.len(), 1);
    let original = fs::read(&files[0]).unwrap();
    let last_len = recs[20].disk_len() as usize;
    let last_start = original.len() - last_len;
    let name = files[0].file_name().unwrap().to_owned();

    for cut in last_start..original.len() {
        let tmp = TempDir::new("torn");
        fs::write(tmp.path().join(&name), &original[..cut]).unwrap();
        let (mut spool, report) = open(tmp.path(), max);
        assert!(report.corrupt.is_empty(), "cut {cut}: {:?}", report.corrupt);
        if cut == last_start {
            assert_eq!(
                report.torn_tail, None,
                "a cut between records is a clean end"
            );
        } else {
            let torn = report.torn_tail.as_ref().expect("torn tail reported");
            assert_eq!(torn.offset, last_start as u64, "cut {cut}");
            assert_eq!(torn.discarded_bytes, (cut - last_start) as u64);
        }
        assert_eq!(report.records, 20);
        assert_eq!(
            contents(&drain(&mut spool)),
            recs[..20].to_vec(),
            "cut {cut}"
        );
        // The tail was cut off for good: appending and reopening finds nothing wrong.
        spool.append(b"k", b"after").unwrap();
        drop(spool);
        let (mut spool, report) = open(tmp.path(), max);
        assert!(
            report.corrupt.is_empty() && report.torn_tail.is_none(),
            "{report:?}"
        );
        let all = contents(&drain(&mut spool));
        assert_eq!(all.len(), 21);
        assert_eq!(all[..20], recs[..20]);
        assert_eq!(all[20].payload, b"after");
    }
}

#[test]
fn torn_segment_header_of_a_new_last_segment() {
    let tmp = TempDir::new("torn-header");
    let max = 1 << 20;
    let recs = random_records(4, 10, 8, 100);
    {
        let (mut spool, _) = open(tmp.path(), max);
        append_all(&mut spool, &recs);
    }
    // A crash right after creating the next segment file, before its header was written whole.
    let first = segment_files(tmp.path())[0].clone();
    let next = tmp.path().join("00000000000000000001.seg");
    assert_eq!(first, tmp.path().join("00000000000000000000.seg"));
    fs::write(&next, &b"FLSPSG\x01"[..]).unwrap();
    let (mut spool, report) = open(tmp.path(), max);
    assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
    assert_eq!(report.torn_tail.map(|t| t.path), Some(next.clone()));
    assert!(!next.exists(), "the empty segment is removed");
    assert_eq!(contents(&drain(&mut spool)), recs);
}

#[test]
fn corrupt_record_skips_rest_of_its_segment_and_replays_later_segments() {
    let tmp = TempDir::new("corrupt");
    let max = 64 << 10;
    let per_segment = 15;
    let recs = fixed_records(60, 4, 512 - 12 - 4);
    {
        let (mut spool, _) = open(tmp.path(), max);
        append_all(&mut spool, &recs);
        spool.sync().unwrap();
    }
    let files = segment_files(tmp.path());
    assert_eq!(files.len(), 4);
    let mut bytes = fs::read(&files[0]).unwrap();
    assert_eq!(bytes.len() as u64, SEGMENT_HEADER + per_segment * 512);
    // A byte inside the payload of the third record of the first segment.
    let bad_record = SEGMENT_HEADER + 2 * 512;
    bytes[(bad_record + 12 + 4 + 100) as usize] ^= 0x40;
    fs::write(&files[0], &bytes).unwrap();
    // And garbage over the header of the second segment.
    let mut second = fs::read(&files[1]).unwrap();
    second[..6].copy_from_slice(b"GARBGE");
    fs::write(&files[1], &second).unwrap();

    let (mut spool, report) = open(tmp.path(), max);
    assert_eq!(report.corrupt.len(), 2, "{:?}", report.corrupt);
    assert_eq!(report.corrupt[0].path, files[0]);
    assert_eq!(report.corrupt[0].offset, bad_record);
    assert!(
        report.corrupt[0].reason.contains("checksum"),
        "{:?}",
        report.corrupt[0]
    );
    let message = report.corrupt[0].to_string();
    assert!(message.contains(&files[0].display().to_string()) && message.contains("1040"));
    assert_eq!(report.corrupt[1].path, files[1]);
    assert_eq!(report.corrupt[1].offset, 0);
    assert_eq!(report.torn_tail, None);
    // Records 0 and 1, then everything of segments 2 and 3.
    let mut want = recs[..2].to_vec();
    want.extend_from_slice(&recs[2 * per_segment as usize..]);
    let replay = drain(&mut spool);
    assert_eq!(contents(&replay), want);

    // Once its valid records are acknowledged, the corrupt file goes like any other.
    spool.ack(replay[0].id).unwrap();
    assert!(files[0].exists());
    spool.ack(replay[1].id).unwrap();
    assert!(!files[0].exists());
}

#[test]
fn corruption_found_while_replaying_is_reported_once_and_skipped() {
    let tmp = TempDir::new("corrupt-live");
    let max = 64 << 10;
    let recs = fixed_records(60, 4, 512 - 12 - 4);
    let (mut spool, _) = open(tmp.path(), max);
    append_all(&mut spool, &recs);
    spool.sync().unwrap();
    // The disk changes under the open spool, before the records are read back.
    let files = segment_files(tmp.path());
    let mut bytes = fs::read(&files[0]).unwrap();
    let bad_record = SEGMENT_HEADER + 2 * 512;
    bytes[(bad_record + 12 + 4 + 7) as usize] ^= 1;
    fs::write(&files[0], &bytes).unwrap();

    // The good records first, then the error once, then the later segments.
    assert_eq!(
        contents(&spool.next_unsent(100).unwrap()),
        recs[..2].to_vec()
    );
    match spool.next_unsent(100) {
        Err(SpoolError::Corrupt { corruption }) => {
            assert_eq!(
                (corruption.path, corruption.offset),
                (files[0].clone(), bad_record)
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(contents(&drain(&mut spool)), recs[15..].to_vec());
    assert_eq!(spool.len_records(), 2 + 45);
}

#[test]
fn corrupt_ack_file_is_reported_and_everything_is_replayed() {
    let tmp = TempDir::new("corrupt-acks");
    let max = 1 << 20;
    let recs = random_records(5, 30, 8, 100);
    {
        let (mut spool, _) = open(tmp.path(), max);
        append_all(&mut spool, &recs);
        let handed = drain(&mut spool);
        spool.ack(handed[5].id).unwrap();
        spool.sync().unwrap();
    }
    let acks = tmp.path().join("acks");
    let mut bytes = fs::read(&acks).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&acks, &bytes).unwrap();
    let (mut spool, report) = open(tmp.path(), max);
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].path, acks);
    // At-least-once: the acknowledged record comes again rather than anything being lost.
    assert_eq!(contents(&drain(&mut spool)), recs);
}

#[test]
fn rewind_redelivers_exactly_the_unacknowledged() {
    let tmp = TempDir::new("rewind");
    let max = 64 << 10;
    let recs = fixed_records(40, 4, 300);
    let (mut spool, _) = open(tmp.path(), max);
    append_all(&mut spool, &recs);
    let first = spool.next_unsent(10).unwrap();
    assert_eq!(contents(&first), recs[..10].to_vec());
    for i in [2, 5, 7] {
        spool.ack(first[i].id).unwrap();
    }
    spool.rewind_unacked();
    let again = drain(&mut spool);
    let want: Vec<usize> = (0..40).filter(|i| ![2, 5, 7].contains(i)).collect();
    assert_eq!(
        contents(&again),
        want.iter().map(|&i| recs[i].clone()).collect::<Vec<_>>()
    );
    // Acks of the first and the second delivery of a record are both fine.
    for r in &again[..again.len() - 1] {
        spool.ack(r.id).unwrap();
    }
    spool.ack(first[0].id).unwrap();
    spool.rewind_unacked();
    assert_eq!(contents(&drain(&mut spool)), vec![recs[39].clone()]);
    assert_eq!(spool.len_records(), 1);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let tmp = TempDir::new("lock");
    let (_spool, _) = open(tmp.path(), 1 << 20);
    assert!(matches!(
        Spool::open(tmp.path(), 1 << 20),
        Err(SpoolError::Locked { .. })
    ));
}

const CRASH_CHILD_ENV: &str = "FLOWLOG_SPOOL_CRASH_CHILD";
/// 1 GiB: 8 MiB segments, so the ~150 MB of records of all rounds span many of them, and room
/// to spare for what the child writes between its last line read and the kill.
const CRASH_MAX_BYTES: u64 = 1 << 30;
const CRASH_ROUNDS: usize = 8;
const CRASH_RECORDS_PER_ROUND: u64 = 30;
/// Large records (up to 1 MB, one write system call each) make it likely that a kill lands in
/// the middle of a write and leaves a torn record, the case recovery must handle.
const CRASH_MAX_PAYLOAD: usize = 1_000_000;

/// Payload bytes of the crash test: record `i`'s payload is `pattern[i % 251..][..len(i)]`, so the
/// child spends its time writing, not generating bytes, and a kill is likely to land in a write.
fn crash_pattern() -> Vec<u8> {
    (0..CRASH_MAX_PAYLOAD + 251)
        .map(|j| (j % 253) as u8)
        .collect()
}

fn crash_payload(pattern: &[u8], i: u64) -> &[u8] {
    let start = (i % 251) as usize;
    let len = ((i * 7_919_993) % CRASH_MAX_PAYLOAD as u64) as usize;
    &pattern[start..start + len]
}

/// The child half of the crash test (does nothing in a normal run): continues the record
/// sequence found in the spool, appending and flushing records forever and saying on stdout
/// which ones were flushed, until the parent kills it.
#[test]
fn crash_child_process() {
    let Ok(dir) = env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let pattern = crash_pattern();
    let (mut spool, report) = open(Path::new(&dir), CRASH_MAX_BYTES);
    for i in report.records.. {
        // Any error (Full would be a mistake in the test's sizes) ends the child, which the parent
        // reports as "ended by itself" instead of waiting for lines that never come.
        spool
            .append(&i.to_le_bytes(), crash_payload(&pattern, i))
            .unwrap();
        spool.flush().unwrap();
        println!("flushed {i}");
    }
}

/// Kills a child that appends and flushes as fast as it can with SIGKILL at a random moment,
/// reopens and checks that every record it reported flushed is there, in order and intact; then
/// again, the next child continuing the same spool after the crash, for several rounds.
#[test]
fn kill_9_mid_stream_loses_no_flushed_record() {
    let tmp = TempDir::new("crash");
    let pattern = crash_pattern();
    let mut rng = StdRng::seed_from_u64(6);
    let mut torn = 0;
    let mut flushed = None;
    for round in 0..CRASH_ROUNDS {
        let mut child = Command::new(env::current_exe().unwrap())
            .args([
                "crash_child_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_ENV, tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let target = (round as u64 + 1) * CRASH_RECORDS_PER_ROUND;
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines {
            if let Some(n) = line.unwrap().strip_prefix("flushed ") {
                let n: u64 = n.parse().unwrap();
                flushed = Some(n);
                if n >= target {
                    break;
                }
            }
        }
        // Let the child run on for a moment, then kill it wherever it is.
        std::thread::sleep(Duration::from_micros(rng.random_range(0..15_000)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "child ended by itself: {status:?}"
        );
        let flushed = flushed.expect("child flushed records");
        assert!(flushed >= target);

        let (mut spool, report) = open(tmp.path(), CRASH_MAX_BYTES);
        assert!(
            report.corrupt.is_empty(),
            "round {round}: {:?}",
            report.corrupt
        );
        torn += usize::from(report.torn_tail.is_some());
        let got = drain(&mut spool);
        assert!(
            got.len() as u64 > flushed,
            "{} records, {flushed} flushed",
            got.len()
        );
        for (i, r) in got.iter().enumerate() {
            let i = i as u64;
            assert!(
                r.key == i.to_le_bytes() && r.payload == crash_payload(&pattern, i),
                "round {round}: record {i} differs"
            );
        }
    }
    assert!(segment_files(tmp.path()).len() > 1, "segments rolled");
    eprintln!("kill -9 crash test: {torn} of {CRASH_ROUNDS} kills left a torn record");
}
