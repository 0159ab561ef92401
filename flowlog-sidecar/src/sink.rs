//! Where flow records go. The agent writes through the [`RecordSink`] trait, so every output
//! (stdout, a file, Kafka, the embedded mode's enricher) slots in without touching capture.
use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::record::{Direction, Family, FlowRecord, Outcome};

/// Why a sink could not take records.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("opening {path} for flow records")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing flow records to {target}")]
    Write {
        target: String,
        source: std::io::Error,
    },
    /// The Kafka output's spool (its write-ahead log) could not take or keep the records.
    #[cfg(feature = "kafka")]
    #[error("writing flow records to spool {}", dir.display())]
    Spool {
        dir: PathBuf,
        source: crate::spool::SpoolError,
    },
    /// An output implemented outside this crate failed (the embedded enricher's Parquet files).
    #[error("writing flow records to {target}")]
    Output {
        target: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// An output for flow records. `write` may buffer; `flush` makes everything written so far
/// durable in the sink's sense (on disk, on the terminal, acknowledged by a broker).
#[allow(async_fn_in_trait)]
pub trait RecordSink {
    /// Takes a batch of records, in order.
    async fn write(&mut self, records: &[FlowRecord]) -> Result<(), SinkError>;
    /// Pushes out everything buffered.
    async fn flush(&mut self) -> Result<(), SinkError>;
    /// Called on each turn of the agent's loop that produced no record (at least every
    /// `--drain-interval`): background work such as replaying the Kafka spool.
    async fn idle(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// Called once when the agent stops, after the last records were written: everything must
    /// be made durable now (close files, flush outputs).
    async fn close(&mut self) -> Result<(), SinkError> {
        self.flush().await
    }
}

/// Records are formatted into a buffer of about this size, then written out (one `write` call
/// each, the buffer being larger than the `BufWriter`'s).
const CHUNK: usize = 256 * 1024;

/// JSON lines, one record per line, to any writer (stdout or a file).
pub struct JsonLines<W: Write> {
    out: BufWriter<W>,
    target: String,
    /// Lines formatted and not yet written (at most about [`CHUNK`] bytes), reused.
    lines: Vec<u8>,
}

impl JsonLines<std::io::Stdout> {
    pub fn stdout() -> Self {
        Self {
            out: BufWriter::with_capacity(64 * 1024, std::io::stdout()),
            target: "stdout".to_string(),
            lines: Vec::with_capacity(CHUNK + 4096),
        }
    }
}

impl JsonLines<std::fs::File> {
    /// Appends to `path`, creating it if needed.
    pub fn file(path: &Path) -> Result<Self, SinkError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| SinkError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            out: BufWriter::with_capacity(64 * 1024, file),
            target: path.display().to_string(),
            lines: Vec::with_capacity(CHUNK + 4096),
        })
    }
}

impl<W: Write> JsonLines<W> {
    fn io_err(&self, source: std::io::Error) -> SinkError {
        SinkError::Write {
            target: self.target.clone(),
            source,
        }
    }
}

impl<W: Write> RecordSink for JsonLines<W> {
    async fn write(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        for record in records {
            write_json(&mut self.lines, record);
            self.lines.push(b'\n');
            // Passed on in chunks of a fixed size: at full churn a batch is megabytes, and
            // growing one buffer to hold it cost a copy of everything written so far at each
            // doubling.
            if self.lines.len() >= CHUNK {
                self.out
                    .write_all(&self.lines)
                    .map_err(|e| self.io_err(e))?;
                self.lines.clear();
            }
        }
        self.out
            .write_all(&self.lines)
            .map_err(|e| self.io_err(e))?;
        self.lines.clear();
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|e| self.io_err(e))
    }
}

/// Appends `record` as one JSON object, byte for byte what `serde_json::to_writer` writes for it
/// (the field names and order of its `Serialize`; a unit test compares the two). Written by
/// hand because this is the agent's hottest path at high connection rates: serde_json escapes
/// every field name and formats each address through a temporary buffer, and that was a third
/// of the agent's CPU time at ~70k records/s.
pub fn write_json(out: &mut Vec<u8>, r: &FlowRecord) {
    out.extend_from_slice(b"{\"flow_id\":");
    write_u64(out, r.flow_id);
    out.extend_from_slice(b",\"host\":");
    write_str(out, &r.host);
    out.extend_from_slice(b",\"seq\":");
    write_u64(out, u64::from(r.seq));
    out.extend_from_slice(b",\"start_ns\":");
    write_u64(out, r.start_ns);
    out.extend_from_slice(b",\"end_ns\":");
    write_u64(out, r.end_ns);
    out.extend_from_slice(match r.family {
        Family::Ipv4 => b",\"family\":\"ipv4\",\"local_addr\":" as &[u8],
        Family::Ipv6 => b",\"family\":\"ipv6\",\"local_addr\":",
    });
    write_addr(out, r.local_addr);
    out.extend_from_slice(b",\"local_port\":");
    write_u64(out, u64::from(r.local_port));
    out.extend_from_slice(b",\"remote_addr\":");
    write_addr(out, r.remote_addr);
    out.extend_from_slice(b",\"remote_port\":");
    write_u64(out, u64::from(r.remote_port));
    out.extend_from_slice(match r.direction {
        Direction::Outbound => b",\"direction\":\"outbound\"" as &[u8],
        Direction::Inbound => b",\"direction\":\"inbound\"",
    });
    out.extend_from_slice(match r.outcome {
        Outcome::Closed => b",\"outcome\":\"closed\"" as &[u8],
        Outcome::Reset => b",\"outcome\":\"reset\"",
        Outcome::Failed => b",\"outcome\":\"failed\"",
        Outcome::Open => b",\"outcome\":\"open\"",
    });
    // One literal per field (not a loop over names): fixed-length copies compile to a few
    // stores, where variable-length ones are `memmove` calls.
    out.extend_from_slice(b",\"bytes_sent\":");
    write_u64(out, r.bytes_sent);
    out.extend_from_slice(b",\"bytes_received\":");
    write_u64(out, r.bytes_received);
    out.extend_from_slice(b",\"segs_sent\":");
    write_u64(out, r.segs_sent);
    out.extend_from_slice(b",\"segs_received\":");
    write_u64(out, r.segs_received);
    out.extend_from_slice(b",\"retransmits\":");
    write_u64(out, r.retransmits);
    out.extend_from_slice(b",\"resets_sent\":");
    write_u64(out, r.resets_sent);
    out.extend_from_slice(b",\"resets_received\":");
    write_u64(out, r.resets_received);
    out.extend_from_slice(b",\"srtt_us\":");
    write_u64(out, u64::from(r.srtt_us));
    out.extend_from_slice(b",\"min_rtt_us\":");
    write_u64(out, u64::from(r.min_rtt_us));
    out.extend_from_slice(b",\"pid\":");
    match r.pid {
        Some(pid) => write_u64(out, u64::from(pid)),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"comm\":");
    match &r.comm {
        Some(comm) => write_str(out, comm),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"cgroup_id\":");
    match r.cgroup_id {
        Some(id) => write_u64(out, id),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(if r.adopted {
        b",\"adopted\":true}"
    } else {
        b",\"adopted\":false}"
    });
}

/// Decimal digits written straight into the buffer's spare capacity, two at a time from the
/// end: formatting into a temporary and copying it in was a `memcpy` call per number,
/// seventeen per record.
fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let len = n.checked_ilog10().unwrap_or(0) as usize + 1;
    out.reserve(len);
    let start = out.len();
    let digits = &mut out.spare_capacity_mut()[..len];
    let mut end = len;
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        digits[end - 2].write(PAIRS[pair]);
        digits[end - 1].write(PAIRS[pair + 1]);
        end -= 2;
    }
    if n >= 10 {
        let pair = n as usize * 2;
        digits[end - 2].write(PAIRS[pair]);
        digits[end - 1].write(PAIRS[pair + 1]);
    } else {
        digits[end - 1].write(b'0' + n as u8);
    }
    // SAFETY: the `len` bytes after the old length were all written above (`end` reaches 0:
    // `len` is exactly the number of digits of the original `n`).
    unsafe { out.set_len(start + len) };
}

/// An address in its `Display` form (what serde writes for `IpAddr` in human-readable formats);
/// it never needs escaping. IPv4 is written here (through `fmt` it cost more than the rest of
/// the record); IPv6, with its zero-run compression rules, through `Display`.
fn write_addr(out: &mut Vec<u8>, addr: IpAddr) {
    out.push(b'"');
    match addr {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            write_u8(out, a);
            out.push(b'.');
            write_u8(out, b);
            out.push(b'.');
            write_u8(out, c);
            out.push(b'.');
            write_u8(out, d);
        }
        // Writing into a Vec cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
    out.push(b'"');
}

fn write_u8(out: &mut Vec<u8>, n: u8) {
    if n >= 100 {
        out.push(b'0' + n / 100);
    }
    if n >= 10 {
        out.push(b'0' + n / 10 % 10);
    }
    out.push(b'0' + n % 10);
}

/// A JSON string with serde_json's escapes: `"` and `\` backslashed, the C0 controls as `\b`,
/// `\t`, `\n`, `\f`, `\r` or `\u00xx`; everything else (UTF-8 included) as is.
fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> FlowRecord {
        FlowRecord {
            flow_id: u64::MAX,
            host: "node-1.example".to_string(),
            seq: 3,
            start_ns: 1_764_000_000_123_456_789,
            end_ns: 1_764_000_001_000_000_000,
            local_addr: "198.51.100.1".parse().unwrap(),
            local_port: 40_000,
            remote_addr: "198.51.100.2".parse().unwrap(),
            remote_port: 443,
            bytes_received: 1,
            segs_sent: 10,
            segs_received: 9,
            retransmits: 2,
            resets_received: 1,
            srtt_us: 51,
            min_rtt_us: 12,
            pid: Some(4242),
            comm: Some("curl".to_string()),
            cgroup_id: Some(9876),
            ..FlowRecord::default()
        }
    }

    fn assert_same_as_serde(r: &FlowRecord) {
        let mut ours = Vec::new();
        write_json(&mut ours, r);
        let serde = serde_json::to_vec(r).unwrap();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(serde).unwrap()
        );
    }

    #[test]
    fn json_is_byte_for_byte_what_serde_json_writes() {
        let mut r = record();
        assert_same_as_serde(&r);
        for (local, remote) in [
            ("0.0.0.0", "255.255.255.255"),
            ("10.9.99.100", "1.20.103.7"),
        ] {
            r.local_addr = local.parse().unwrap();
            r.remote_addr = remote.parse().unwrap();
            assert_same_as_serde(&r);
        }
        // IPv6 (compressed, and IPv4-mapped forms), the other enum values, absent process.
        r.family = Family::Ipv6;
        r.local_addr = "2001:db8::1".parse().unwrap();
        r.remote_addr = "::ffff:198.51.100.2".parse().unwrap();
        r.direction = Direction::Inbound;
        r.pid = None;
        r.comm = None;
        r.cgroup_id = None;
        r.adopted = true;
        for outcome in Outcome::ALL {
            r.outcome = outcome;
            assert_same_as_serde(&r);
        }
        // Names that need escaping: every control character, quotes, backslashes, non-ASCII,
        // and what a command name lossily decoded from the kernel can hold (U+FFFD).
        let controls: String = (0u8..0x20).map(char::from).collect();
        for name in [
            controls.as_str(),
            "a\"b\\c",
            "\u{7f}é漢\u{fffd}",
            "",
            "\\",
            "x\n",
        ] {
            r.host = name.to_string();
            r.comm = Some(name.chars().rev().collect());
            assert_same_as_serde(&r);
        }
    }

    #[tokio::test]
    async fn lines_are_records_separated_by_newlines() {
        let mut sink = JsonLines {
            out: BufWriter::new(Vec::new()),
            target: "memory".to_string(),
            lines: Vec::new(),
        };
        // Small batches, an empty one, and one of several chunks.
        let batches: Vec<Vec<FlowRecord>> = [2, 0, 1, 2 * CHUNK / 300]
            .into_iter()
            .scan(0u32, |seq, n| {
                let batch = (0..n)
                    .map(|_| {
                        let mut r = record();
                        r.seq = *seq;
                        *seq += 1;
                        r
                    })
                    .collect();
                Some(batch)
            })
            .collect();
        for batch in &batches {
            sink.write(batch).await.unwrap();
        }
        sink.flush().await.unwrap();
        let text = String::from_utf8(sink.out.into_inner().unwrap()).unwrap();
        let parsed: Vec<FlowRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed, batches.concat());
        assert!(text.ends_with("}\n"));
        assert!(
            sink.lines.capacity() < 2 * CHUNK,
            "the buffer stays at about a chunk"
        );
    }
}
