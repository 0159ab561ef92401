//! `kafka`: what the Kafka output costs, measured on real flow records against a real
//! Kafka-protocol broker (tansu on 127.0.0.1). Run it through `benches/kafka`, as root (the
//! capture loads the agent's BPF programs); it is not a test.
//!
//! 1. Capture: the release agent records a mix of loopback traffic (capture.rs).
//! 2. Wire: those records through the agent's own `KafkaSink` at several rates; bytes per record
//!    from librdkafka's statistics, batch and whole-connection figures (wire.rs); and which
//!    fields the compressed bytes go to (attribution.rs).
//! 3. Throughput: the codec alone, and encode + produce through the sink against a plain
//!    producer sending the same pre-encoded records, as a ratio in the same run (throughput.rs).
mod attribution;
mod capture;
mod throughput;

mod wire;

// The churn harness's load and its way of running the sidecar, shared rather than copied.
#[allow(dead_code)]
#[path = "../churn/attach.rs"]
mod attach;
#[allow(dead_code)]
#[path = "../churn/load.rs"]
mod load;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, Write as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use flowlog_record::record::FlowRecord;
use flowlog_sidecar::kafka::Partitioning;
use wire::{Condition, WireResult};

/// Target from DESIGN.md: bytes per flow record on Kafka after batch compression.
const MAX_WIRE_BYTES: f64 = 24.0;
/// Target from the issue: encoding records per second per core.
const MIN_ENCODE_PER_CORE: f64 = 1e6;

/// Bytes on the wire and encode/produce throughput of flowlog's Kafka output.
#[derive(Debug, Parser)]
struct Args {
    /// The release build of flowlog-sidecar (for the capture).
    #[arg(long, env = "FLOWLOG_BENCH_SIDECAR")]
    sidecar: Option<PathBuf>,
    /// Kafka bootstrap servers (a broker of your own: topics are created and deleted).
    #[arg(long, env = "FLOWLOG_BENCH_KAFKA", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Use the records of this JSON-lines file (e.g. from `--save-records`) instead of capturing.
    #[arg(long)]
    records: Option<PathBuf>,
    /// Write the captured records to this JSON-lines file.
    #[arg(long)]
    save_records: Option<PathBuf>,
    /// How long the capture's traffic runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    capture: Duration,
    /// Connect/close churn of the capture, connections per second (two flows each).
    #[arg(long, default_value_t = 1000.0)]
    capture_rate: f64,
    /// Partitions of each benchmark topic (records spread over them by key).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Records per throughput trial (the captured ones, repeated as needed).
    #[arg(long, default_value_t = 100_000)]
    volume: usize,
    /// Only the capture and the wire measurements.
    #[arg(long)]
    skip_throughput: bool,
    /// Only the capture and the throughput measurements.
    #[arg(long)]
    skip_wire: bool,
    /// librdkafka options (`KEY=VALUE`, repeatable) on top of the agent's defaults for both the
    /// sink and the baseline of the throughput trials.
    #[arg(long = "throughput-option")]
    throughput_options: Vec<String>,
    /// Interleaved rounds of the throughput trials.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Extra wire conditions: `RATE:KEY=VALUE[,KEY=VALUE…]` (records/s, or `max`; librdkafka
    /// options on top of the agent's defaults), e.g. `2000:linger.ms=200`.
    #[arg(long = "wire-variant")]
    wire_variants: Vec<String>,
    /// Which code is measured (a commit), printed in the report.
    #[arg(long, env = "FLOWLOG_BENCH_REVISION", default_value = "unknown")]
    revision: String,
    /// Work directory (capture output, spools); default a new one under the temp dir, removed
    /// at the end.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (work_dir, remove_work_dir) = match &args.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("flowlog-kafka-bench-{}", std::process::id())),
            true,
        ),
    };
    fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let result = run(&args, &work_dir);
    if remove_work_dir {
        let _ = fs::remove_dir_all(&work_dir);
    }
    result
}

fn run(args: &Args, work_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut out = String::new();
    let (records, how) = match &args.records {
        Some(path) => (read_records(path)?, format!("read from {}", path.display())),
        None => {
            let sidecar = args
                .sidecar
                .as_ref()
                .context("--sidecar (or --records) is needed")?;
            eprintln!("capturing for {:?}…", args.capture);
            let (records, s) =
                capture::capture(sidecar, work_dir, args.capture, args.capture_rate)?;
            let how = format!(
                "captured by flowlog-sidecar in {:?}: {} churn connections at {} conn/s, {} \
                 transfers ({} bytes), {} refused connects, {} abortive closes, and the host's \
                 other flows",
                args.capture,
                s.churn_connections,
                args.capture_rate,
                s.transfers,
                s.transfer_bytes,
                s.refused,
                s.aborted
            );
            (records, how)
        }
    };
    anyhow::ensure!(!records.is_empty(), "no records to measure with");
    if let Some(path) = &args.save_records {
        let mut f = std::io::BufWriter::new(
            fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        for r in &records {
            serde_json::to_writer(&mut f, r)?;
            f.write_all(b"\n")?;
        }
    }

    writeln!(
        out,
        "## Kafka output: bytes on the wire and throughput\n\nflowlog {}; kernel {}; {} \
         CPUs; broker {} (tansu). Records: {} {how}.\n",
        args.revision,
        uname_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.brokers,
        records.len(),
    )?;
    describe_records(&mut out, &records)?;

    // Wire.
    let mut conditions = vec![
        Condition {
            label: "200 records/s".into(),
            rate: Some(200.0),
            partitions: args.partitions,
            options: vec![],
            partitioning: Partitioning::Host,
        },
        Condition {
            label: "2,000 records/s (1,000 conn/s, both ends)".into(),
            rate: Some(2000.0),
            partitions: args.partitions,
            options: vec![],
            partitioning: Partitioning::Host,
        },
        Condition {
            label: "20,000 records/s".into(),
            rate: Some(20_000.0),
            partitions: args.partitions,
            options: vec![],
            partitioning: Partitioning::Host,
        },
        Condition {
            label: "unpaced".into(),
            rate: None,
            partitions: args.partitions,
            options: vec![],
            partitioning: Partitioning::Host,
        },
        // The baseline, in the same run: records spread over the partitions by flow.
        Condition {
            label: "200 records/s, partitioning=flow (before)".into(),
            rate: Some(200.0),
            partitions: args.partitions,
            options: vec![],
            partitioning: Partitioning::Flow,
        },
        Condition {
            label: "2,000 records/s, partitioning=flow (before)".into(),
            rate: Some(2000.0),
            partitions: args.partitions,
            options: vec![],
            partitioning: Partitioning::Flow,
        },
    ];
    for v in &args.wire_variants {
        conditions.push(parse_variant(v, args.partitions)?);
    }
    let mut results = Vec::new();
    for c in conditions.iter().filter(|_| !args.skip_wire) {
        let n = match c.rate {
            // At least 10 s, and at least the captured records once.
            Some(rate) => ((rate * 10.0) as usize).max(records.len().min(args.volume)),
            // Each record once: a repeat inside one batch would compress to nothing.
            None => records.len(),
        };
        let set: Vec<FlowRecord> = records.iter().cycle().take(n).cloned().collect();
        eprintln!("wire: {} ({n} records)…", c.label);
        let r = wire::measure(&args.brokers, &set, c, work_dir)
            .with_context(|| format!("wire condition {}", c.label))?;
        results.push((c.clone(), r));
    }
    if !args.skip_wire {
        report_wire(&mut out, &results, args.partitions)?;
        eprintln!("attribution…");
        report_attribution(&mut out, &records, &results)?;
    }

    if !args.skip_throughput {
        report_throughput(&mut out, args, &records, work_dir)?;
    }

    print!("{out}");
    Ok(())
}

fn read_records(path: &std::path::Path) -> anyhow::Result<Vec<FlowRecord>> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::BufReader::new(f)
        .lines()
        .map(|line| {
            let line = line?;
            serde_json::from_str(&line)
                .with_context(|| format!("parsing a record of {}: {line}", path.display()))
        })
        .collect()
}

fn uname_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn parse_variant(v: &str, partitions: i32) -> anyhow::Result<Condition> {
    let (rate, opts) = v
        .split_once(':')
        .with_context(|| format!("--wire-variant {v}: expected RATE:KEY=VALUE[,…]"))?;
    let rate = match rate {
        "max" => None,
        r => Some(r.parse::<f64>().with_context(|| format!("rate {r}"))?),
    };
    let mut partitioning = Partitioning::default();
    let mut options = Vec::new();
    for kv in opts.split(',') {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--wire-variant option {kv}: expected KEY=VALUE"))?;
        // `partitioning` is the sink's (`--kafka-partitioning`); the rest are librdkafka's.
        if k == "partitioning" {
            partitioning = v.parse().map_err(anyhow::Error::msg)?;
        } else {
            options.push((k.to_string(), v.to_string()));
        }
    }
    let label = format!(
        "{}, {opts}",
        rate.map_or("unpaced".to_string(), |r| format!("{r} records/s"))
    );
    Ok(Condition {
        label,
        rate,
        partitions,
        options,
        partitioning,
    })
}

fn describe_records(out: &mut String, records: &[FlowRecord]) -> anyhow::Result<()> {
    let mut outcomes = std::collections::BTreeMap::new();
    let mut raw = 0usize;
    let mut buf = Vec::new();
    for r in records {
        *outcomes.entry(r.outcome.as_str()).or_insert(0u64) += 1;
        buf.clear();
        flowlog_record::avro::key_into(r, &mut buf);
        flowlog_record::avro::encode(r, flowlog_record::avro::DEFAULT_SCHEMA_ID, &mut buf);
        raw += buf.len();
    }
    let outcomes: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let loopback = records
        .iter()
        .filter(|r| r.remote_addr.is_loopback())
        .count();
    writeln!(
        out,
        "Outcomes: {}; {loopback} of {} with a loopback peer; key + value {:.1} bytes per \
         record before compression (host name `{}`).\n",
        outcomes.join(", "),
        records.len(),
        raw as f64 / records.len() as f64,
        records[0].host,
    )?;
    Ok(())
}

fn report_wire(
    out: &mut String,
    results: &[(Condition, WireResult)],
    partitions: i32,
) -> anyhow::Result<()> {
    let default = |key: &str| {
        flowlog_sidecar::kafka::PRODUCER_DEFAULTS
            .iter()
            .find(|(k, _)| *k == key)
            .map_or("librdkafka's default", |(_, v)| *v)
    };
    let (linger, batch) = (default("linger.ms"), default("batch.size"));
    writeln!(
        out,
        "### Bytes per record on the wire\n\nEach condition: the records through the agent's \
         `KafkaSink` (spool, acks=all, idempotent, zstd, linger.ms={linger}, batch.size={batch} \
         unless the condition says otherwise) into a fresh topic of {partitions} partitions, handed \
         over every 100 ms (the agent's drain interval) at the rate shown. From librdkafka's \
         statistics: **batch** = the RecordBatches it built (61-byte header + zstd-compressed \
         records: what the broker stores and consumers fetch) ÷ records; **sent** = every byte \
         it wrote to the broker connections over the condition (ProduceRequest framing, \
         metadata and other requests included; TCP/IP headers not) ÷ records. Process CPU: \
         this benchmark process over the condition (getrusage; the sink, librdkafka's threads, \
         and the statistics emitted for this measurement).\n"
    )?;
    writeln!(
        out,
        "| condition | records | acknowledged in | records per batch | uncompressed key+value B/rec | batch B/rec | sent B/rec | requests | process CPU, % of a core | target |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|")?;
    for (c, r) in results {
        let batch = r.per_record(r.batch_bytes);
        writeln!(
            out,
            "| {} | {} | {:.1} s | {:.1} | {:.1} | **{:.1}** | {:.1} | {} | {:.1}% | {} |",
            c.label,
            r.records,
            r.elapsed.as_secs_f64(),
            r.batch_messages as f64 / r.batches.max(1) as f64,
            r.per_record(r.raw_bytes),
            batch,
            r.per_record(r.tx_bytes),
            r.requests,
            100.0 * r.cpu.as_secs_f64() / r.elapsed.as_secs_f64(),
            if batch <= MAX_WIRE_BYTES {
                "≤ 24: met"
            } else {
                "≤ 24: **MISSED**"
            },
        )?;
        if r.batch_messages != r.records {
            writeln!(
                out,
                "\n(note: batches held {} messages for {} records: retried batches)\n",
                r.batch_messages, r.records
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn report_attribution(
    out: &mut String,
    records: &[FlowRecord],
    results: &[(Condition, WireResult)],
) -> anyhow::Result<()> {
    // Batch sizes the broker conditions actually had.
    let mut sizes: Vec<usize> = results
        .iter()
        .take(3)
        .map(|(_, r)| ((r.batch_messages as f64 / r.batches.max(1) as f64).round() as usize).max(1))
        .collect();
    sizes.dedup();
    let level = attribution::LIBRDKAFKA_ZSTD_LEVEL;
    writeln!(
        out,
        "### Where the compressed bytes go\n\nThe captured records in capture order, laid out \
         as Kafka v2 batches of n messages and compressed with zstd level {level} offline (61-byte \
         header included); then with one field set to a constant on every record. \"saved\" = \
         bytes per record that field costs after compression. Consecutive records share a batch \
         here; with several partitions a batch holds every P-th record, which the broker rows \
         above include.\n"
    )?;
    let mut header = "| variant |".to_string();
    let mut rule = "|---|".to_string();
    for n in &sizes {
        write!(header, " n = {n}: B/rec | saved |")?;
        rule.push_str("---|---|");
    }
    writeln!(out, "{header}\n{rule}")?;
    let base: Vec<f64> = sizes
        .iter()
        .map(|&n| attribution::bytes_per_record(records, n, level))
        .collect();
    let mut row = "| as captured |".to_string();
    for b in &base {
        write!(row, " {b:.1} | – |")?;
    }
    writeln!(out, "{row}")?;
    let mut variants: Vec<(String, Vec<FlowRecord>)> = attribution::FIELDS
        .iter()
        .map(|(name, f)| {
            (
                format!("{name} := constant"),
                attribution::transformed(records, *f),
            )
        })
        .collect();
    variants.push((
        "flow_id := run base + counter in flow start order (simulated)".into(),
        counter_ids(records),
    ));
    for (name, set) in &variants {
        let mut row = format!("| {name} |");
        for (i, &n) in sizes.iter().enumerate() {
            let b = attribution::bytes_per_record(set, n, level);
            write!(row, " {b:.1} | {:.1} |", base[i] - b)?;
        }
        writeln!(out, "{row}")?;
    }
    writeln!(out)?;
    Ok(())
}

/// The records with flow ids re-made as a fixed random base plus a counter in the order the flows
/// started (what a per-run base + counter scheme would give), the same on every record of a flow.
fn counter_ids(records: &[FlowRecord]) -> Vec<FlowRecord> {
    let mut starts: Vec<(u64, u64)> = records.iter().map(|r| (r.start_ns, r.flow_id)).collect();
    starts.sort_unstable();
    starts.dedup_by_key(|s| s.1);
    let mut ids = std::collections::HashMap::new();
    let base = 0x5bd1_e995_3c6e_f372u64;
    for (_, id) in starts {
        let next = base.wrapping_add(ids.len() as u64);
        ids.entry(id).or_insert(next);
    }
    records
        .iter()
        .map(|r| FlowRecord {
            flow_id: ids[&r.flow_id],
            ..r.clone()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report_throughput(
    out: &mut String,
    args: &Args,
    records: &[FlowRecord],
    work_dir: &std::path::Path,
) -> anyhow::Result<()> {
    eprintln!("throughput: encoding…");
    let encode_total = 2_000_000;
    let _ = throughput::encode_only(records, encode_total / 10); // warm-up
    let encodes: Vec<throughput::Run> = (0..args.rounds.max(1))
        .map(|_| throughput::encode_only(records, encode_total))
        .collect();
    let set: Vec<FlowRecord> = records.iter().cycle().take(args.volume).cloned().collect();
    let encoded = throughput::pre_encode(&set);
    let options = args
        .throughput_options
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--throughput-option {kv}: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut sink_runs = Vec::new();
    let mut plain_runs = Vec::new();
    for round in 0..args.rounds.max(1) {
        eprintln!("throughput: round {} of {}…", round + 1, args.rounds);
        sink_runs.push(throughput::through_sink(
            &args.brokers,
            &set,
            &options,
            work_dir,
        )?);
        plain_runs.push(throughput::plain_producer(
            &args.brokers,
            &encoded,
            &options,
        )?);
    }
    let enc_per_core = median(encodes.iter().map(|r| r.per_cpu_second()).collect());
    writeln!(
        out,
        "### Throughput\n\nEncoding alone: key + Confluent-framed Avro of {encode_total} records \
         (the captured ones, cycled) into reused buffers on one thread, CPU time of that thread, \
         median of {} rounds: **{:.2}M records/s per core** ({} per round; target ≥ 1M: {}).\n",
        encodes.len(),
        enc_per_core / 1e6,
        encodes
            .iter()
            .map(|r| format!("{:.2}M", r.per_cpu_second() / 1e6))
            .collect::<Vec<_>>()
            .join(", "),
        if enc_per_core >= MIN_ENCODE_PER_CORE {
            "met"
        } else {
            "**MISSED**"
        }
    )?;
    writeln!(
        out,
        "Encode + produce, {} records per trial into a fresh 3-partition topic, until the broker \
         acknowledged every one; {} interleaved rounds. **KafkaSink**: the agent's sink (encode, \
         spool write-ahead, produce, delivery reports, acks), records handed over 4,096 at a \
         time. **baseline**: a plain rdkafka ThreadedProducer, same configuration, the same \
         records pre-encoded (not timed), no spool. CPU = the whole benchmark process \
         (getrusage: our threads and librdkafka's; not the broker's, which shares the 2 CPUs).\n",
        args.volume, args.rounds
    )?;
    writeln!(
        out,
        "| | acknowledged records/s per round | median | CPU µs per record per round | median | records per CPU-second |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for (label, runs) in [("KafkaSink", &sink_runs), ("baseline", &plain_runs)] {
        writeln!(
            out,
            "| {label} | {} | {:.0} | {} | {:.2} | {:.0} |",
            runs.iter()
                .map(|r| format!("{:.0}", r.per_second()))
                .collect::<Vec<_>>()
                .join(", "),
            median(runs.iter().map(|r| r.per_second()).collect()),
            runs.iter()
                .map(|r| format!("{:.2}", r.cpu_ns_per_record() / 1e3))
                .collect::<Vec<_>>()
                .join(", "),
            median(runs.iter().map(|r| r.cpu_ns_per_record() / 1e3).collect()),
            median(runs.iter().map(|r| r.per_cpu_second()).collect()),
        )?;
    }
    let rate_ratio = median(
        sink_runs
            .iter()
            .zip(&plain_runs)
            .map(|(s, p)| s.per_second() / p.per_second())
            .collect(),
    );
    let cpu_ratio = median(
        sink_runs
            .iter()
            .zip(&plain_runs)
            .map(|(s, p)| s.cpu_ns_per_record() / p.cpu_ns_per_record())
            .collect(),
    );
    writeln!(
        out,
        "\nKafkaSink vs baseline, median of per-round ratios: acknowledged records/s × {rate_ratio:.2}, \
         CPU per record × {cpu_ratio:.2}.\n"
    )?;
    Ok(())
}
