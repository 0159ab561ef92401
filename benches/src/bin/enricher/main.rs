//! `enricher`: the enricher end to end, librdkafka included, against a real Kafka-protocol
//! broker (tansu on 127.0.0.1). Run it through `benches/enricher`, as root (the latency half
//! loads the agent's BPF programs); it is not a test.
//!
//! 1. Throughput: `flows.raw` pre-filled with a fleet's records (fleet.rs: hundreds of hosts,
//!    pods, services, the Internet); one release `flowlog-enricher` pinned to one CPU reads
//!    them all and writes `flows.enriched` and Parquet; against it, in the same run and on the
//!    same CPU, a pass-through consumer/producer with the enricher's Kafka settings
//!    (passthrough.rs). Flows per CPU-second of each process (all its threads) and wall rates.
//! 2. Latency: live agents at fixed offered loads, connection end → enriched record readable
//!    (latency.rs).
mod fleet;
mod latency;
mod passthrough;
mod replica;

// The churn harness's load and its way of running the sidecar, shared rather than copied.
#[allow(dead_code)]
#[path = "../churn/attach.rs"]
mod attach;
#[allow(dead_code)]
#[path = "../churn/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../churn/procfs.rs"]
mod procfs;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use flowlog_record::avro;
use flowlog_testkit::Topic;
use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer},
};
use serde::{Deserialize, Serialize};

use fleet::Fleet;
use replica::Replica;

/// DESIGN.md's target: Kafka to Kafka, flows per second per core.
const MIN_FLOWS_PER_CORE: f64 = 200_000.0;
/// DESIGN.md's target: connection end → enriched, p99.
const MAX_P99_SECONDS: f64 = 2.0;

/// The enricher's throughput per core and its end-to-end latency.
#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// The release build of flowlog-enricher.
    #[arg(long, env = "FLOWLOG_BENCH_ENRICHER")]
    enricher: Option<PathBuf>,
    /// The release build of flowlog-sidecar (the latency half's agent).
    #[arg(long, env = "FLOWLOG_BENCH_SIDECAR")]
    sidecar: Option<PathBuf>,
    /// Kafka bootstrap servers (a broker of your own: topics are created and deleted).
    #[arg(long, env = "FLOWLOG_BENCH_KAFKA", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Records pre-filled into flows.raw for the throughput half.
    #[arg(long, default_value_t = 2_000_000)]
    records: u64,
    /// Hosts of the fleet.
    #[arg(long, default_value_t = 500)]
    hosts: u32,
    /// Pods of the fleet (each a static inventory entry).
    #[arg(long, default_value_t = 20_000)]
    pods: u32,
    /// Partitions of flows.raw and flows.enriched.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// The CPU the enricher and the baseline are pinned to.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Rounds of the throughput half (baseline and enricher alternate).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Offered loads of the latency half, connections per second (two records each).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rates: Vec<f64>,
    /// How long each offered load runs.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long)]
    skip_throughput: bool,
    #[arg(long)]
    skip_latency: bool,
    /// Commit of the code under test, for the report.
    #[arg(long, default_value = "unknown")]
    revision: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The baseline (run by the harness, pinned): copy COUNT messages INPUT → OUTPUT, print
    /// what it measured as JSON.
    Passthrough {
        #[arg(long)]
        input: String,
        #[arg(long)]
        output: String,
        #[arg(long)]
        group: String,
        #[arg(long)]
        count: u64,
    },
}

/// What one process did over a run: records through, wall time and CPU time (all threads),
/// and the part of that CPU time librdkafka's own threads took.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Measured {
    pub records: u64,
    pub wall: Duration,
    pub cpu: Duration,
    /// CPU of librdkafka's threads ([`procfs::librdkafka_ticks`]), included in `cpu`.
    pub librdkafka: Duration,
}

impl Measured {
    fn per_cpu_second(&self) -> f64 {
        self.records as f64 / self.cpu.as_secs_f64()
    }
    fn per_second(&self) -> f64 {
        self.records as f64 / self.wall.as_secs_f64()
    }
    fn cpu_us_per_record(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.records as f64
    }
    /// CPU per record outside librdkafka's threads: the program's own work.
    fn own_us_per_record(&self) -> f64 {
        self.cpu.saturating_sub(self.librdkafka).as_secs_f64() * 1e6 / self.records as f64
    }
    /// librdkafka's share of the CPU, %.
    fn librdkafka_pct(&self) -> f64 {
        100.0 * self.librdkafka.as_secs_f64() / self.cpu.as_secs_f64()
    }
}

/// CPU time (user + system) of this process, all threads.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage fills a struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    d(u.ru_utime) + d(u.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Cmd::Passthrough {
        input,
        output,
        group,
        count,
    }) = &args.command
    {
        let measured = passthrough::run(&args.brokers, input, output, group, *count)?;
        println!("{}", serde_json::to_string(&measured)?);
        return Ok(());
    }
    let enricher = args
        .enricher
        .clone()
        .context("--enricher: the release flowlog-enricher (benches/enricher passes it)")?;
    let work_dir =
        std::env::temp_dir().join(format!("flowlog-bench-enricher-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    let fleet = Fleet {
        hosts: args.hosts,
        pods: args.pods,
        services: 2_000,
        internet: 5_000,
    };
    let static_file = work_dir.join("inventory.toml");
    std::fs::write(&static_file, fleet.static_inventory())
        .with_context(|| format!("writing {}", static_file.display()))?;
    let mut report = String::new();
    writeln!(report, "## Enricher end to end\n")?;
    writeln!(
        report,
        "flowlog {}; kernel {}; {} CPUs; broker {} (tansu, pinned by benches/enricher to CPU 0 \
         unless FLOWLOG_BENCH_KAFKA names another); static inventory of {} hosts, {} pods, {} \
         services ({} bytes).\n",
        args.revision,
        kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.brokers,
        fleet.hosts,
        fleet.pods,
        fleet.services,
        std::fs::metadata(&static_file)?.len()
    )?;
    if !args.skip_throughput {
        throughput(
            &args,
            &fleet,
            &enricher,
            &static_file,
            &work_dir,
            &mut report,
        )?;
    }
    if !args.skip_latency {
        let sidecar = args
            .sidecar
            .clone()
            .context("--sidecar: the release flowlog-sidecar (benches/enricher passes it)")?;
        latency_half(
            &args,
            &sidecar,
            &enricher,
            &static_file,
            &work_dir,
            &mut report,
        )?;
    }
    print!("{report}");
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// Produces the fleet's records into `topic`, a host's records to its partition (as the agents
/// do), with the agent's batching; returns how many remote ends are Internet addresses (the
/// `unknown` ones the enricher must report).
fn prefill(
    brokers: &str,
    topic: &Topic,
    fleet: &Fleet,
    n: u64,
    partitions: i32,
) -> anyhow::Result<u64> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("compression.type", "zstd")
        .set("linger.ms", "200")
        .set("batch.size", "1048576")
        .set("queue.buffering.max.messages", "1000000")
        .set("acks", "all")
        .create()
        .context("creating the pre-fill producer")?;
    let now = now_ns();
    let started = Instant::now();
    let mut unknown_remote = 0;
    let mut value = Vec::with_capacity(256);
    for i in 0..n {
        let record = fleet.record(i, now, 600_000_000_000);
        unknown_remote += u64::from(!is_inventoried(&record.remote_addr));
        let key = avro::key(&record);
        value.clear();
        avro::encode(&record, avro::DEFAULT_SCHEMA_ID, &mut value);
        let partition = avro::host_partition(&key, partitions).context("partitioning")?;
        let mut message = BaseRecord::to(&topic.name)
            .key(&key)
            .payload(&value)
            .partition(partition);
        loop {
            match producer.send(message) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context("pre-filling flows.raw"),
            }
        }
        if i % 500_000 == 499_999 {
            eprintln!(
                "pre-fill: {} records queued, {:.0} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    producer
        .flush(Duration::from_secs(600))
        .context("flushing the pre-fill")?;
    eprintln!(
        "pre-fill: {n} records acknowledged in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(unknown_remote)
}

/// Whether the fleet's static inventory holds `addr` (10/8 and 172.20/16 are inventoried).
fn is_inventoried(addr: &std::net::IpAddr) -> bool {
    match addr {
        std::net::IpAddr::V4(a) => a.octets()[0] == 10 || a.octets()[..2] == [172, 20],
        std::net::IpAddr::V6(_) => false,
    }
}

fn throughput(
    args: &Args,
    fleet: &Fleet,
    enricher: &Path,
    static_file: &Path,
    work_dir: &Path,
    report: &mut String,
) -> anyhow::Result<()> {
    let raw = Topic::create_on(&args.brokers, "bench-e2e-raw", args.partitions);
    let unknown_remote = prefill(&args.brokers, &raw, fleet, args.records, args.partitions)?;
    let n = args.records;
    let mut baselines = Vec::new();
    let mut enrichers = Vec::new();
    for round in 0..args.rounds {
        // The baseline.
        let out = Topic::create_on(&args.brokers, "bench-e2e-pass", args.partitions);
        let exe = std::env::current_exe()?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(args.cpu.to_string())
            .arg(&exe)
            .args([
                "--brokers",
                &args.brokers,
                "passthrough",
                "--input",
                &raw.name,
            ])
            .args([
                "--output",
                &out.name,
                "--group",
                &format!("{}-pass-{round}", raw.name),
            ])
            .args(["--count", &n.to_string()])
            .output()
            .context("running the pass-through baseline")?;
        if !child.status.success() {
            bail!(
                "the pass-through baseline failed ({}): {}",
                child.status,
                String::from_utf8_lossy(&child.stderr)
            );
        }
        let baseline: Measured =
            serde_json::from_slice(&child.stdout).context("reading the baseline's measurement")?;
        eprintln!(
            "round {round}: baseline {:.0} flows/CPU-s",
            baseline.per_cpu_second()
        );
        baselines.push(baseline);
        drop(out);

        // The enricher.
        let enriched = Topic::create_on(&args.brokers, "bench-e2e-enriched", args.partitions);
        let dlq = Topic::create_on(&args.brokers, "bench-e2e-dlq", 1);
        let parquet = work_dir.join(format!("parquet-{round}"));
        let mut replica = Replica::start(
            enricher,
            &replica::Pipeline {
                brokers: &args.brokers,
                input: &raw.name,
                output: &enriched.name,
                dlq: &dlq.name,
                group: format!("{}-enricher-{round}", raw.name),
                static_file,
                parquet: parquet.clone(),
            }
            .args(),
            Some(args.cpu),
            &work_dir.join(format!("enricher-{round}.log")),
        )?;
        replica.wait_for(
            "flowlog_enricher_records_in_total",
            1.0,
            Duration::from_secs(120),
        )?;
        let (start, cpu0, rdk0) = (
            Instant::now(),
            replica.cpu_seconds()?,
            replica.librdkafka_seconds()?,
        );
        replica.wait_for(
            "flowlog_enricher_records_out_total",
            n as f64,
            Duration::from_secs(900),
        )?;
        let measured = Measured {
            records: n,
            wall: start.elapsed(),
            cpu: Duration::from_secs_f64(replica.cpu_seconds()? - cpu0),
            librdkafka: Duration::from_secs_f64(replica.librdkafka_seconds()? - rdk0),
        };
        let page = replica.scrape()?;
        let remote = |status: &str| {
            replica::sum(
                &page,
                &format!("flowlog_enricher_attributed_total{{end=\"remote\",status=\"{status}\"}}"),
            )
        };
        let (exact, unknown) = (remote("exact"), remote("unknown"));
        replica.stop()?;
        let parquet_bytes = dir_bytes(&parquet)?;
        eprintln!(
            "round {round}: enricher {:.0} flows/CPU-s; remote exact {exact}, unknown {unknown} \
             (expected {}); Parquet {parquet_bytes} bytes",
            measured.per_cpu_second(),
            unknown_remote
        );
        if unknown != unknown_remote as f64 || exact + unknown != n as f64 {
            bail!(
                "round {round}: remote ends exact {exact} + unknown {unknown}; expected {} + {unknown_remote}",
                n - unknown_remote
            );
        }
        enrichers.push((measured, parquet_bytes));
    }
    writeln!(report, "### Throughput on one core\n")?;
    writeln!(
        report,
        "{n} records of {} hosts pre-filled into a {}-partition flows.raw (zstd, a host's records \
         to one partition). Each trial reads all of them from the beginning in a new consumer \
         group, pinned to CPU {}: **baseline** = a pass-through consumer/producer with the \
         enricher's librdkafka settings (every message re-produced unchanged); **enricher** = \
         the release flowlog-enricher (decode, both ends looked up in the static inventory, \
         flows.enriched produced and acknowledged, Parquet written). Measured \
         from the first record read to the last output acknowledged (flowlog_enricher_records_out_total); \
         CPU = the process, all threads (librdkafka's included), and apart from it the CPU of \
         librdkafka's own threads (`rdk:*` and the producer's polling thread) and what is left, \
         the program's own work; the broker runs on the other CPU. Every trial's remote ends: {} exact, {unknown_remote} unknown (Internet), as \
         generated.\n",
        fleet.hosts,
        args.partitions,
        args.cpu,
        n - unknown_remote
    )?;
    writeln!(
        report,
        "| round | baseline flows/CPU-s | baseline wall flows/s | baseline librdkafka share | enricher flows/CPU-s | enricher µs CPU/flow | enricher librdkafka share | enricher µs CPU/flow outside librdkafka | enricher wall flows/s | enricher/baseline CPU per flow | Parquet bytes/flow | target |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (round, (b, (e, parquet))) in baselines.iter().zip(&enrichers).enumerate() {
        writeln!(
            report,
            "| {round} | {:.0} | {:.0} | {:.0}% | **{:.0}** | {:.2} | {:.0}% | {:.2} | {:.0} | {:.2}× | {:.1} | ≥ {MIN_FLOWS_PER_CORE:.0}/core: {} |",
            b.per_cpu_second(),
            b.per_second(),
            b.librdkafka_pct(),
            e.per_cpu_second(),
            e.cpu_us_per_record(),
            e.librdkafka_pct(),
            e.own_us_per_record(),
            e.per_second(),
            e.cpu_us_per_record() / b.cpu_us_per_record(),
            *parquet as f64 / n as f64,
            if e.per_cpu_second() >= MIN_FLOWS_PER_CORE {
                "met"
            } else {
                "**MISSED**"
            }
        )?;
    }
    writeln!(report)?;
    Ok(())
}

fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    if !dir.exists() {
        return Ok(0);
    }
    for entry in walk(dir)? {
        total += std::fs::metadata(&entry)?.len();
    }
    Ok(total)
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

fn latency_half(
    args: &Args,
    sidecar: &Path,
    enricher: &Path,
    static_file: &Path,
    work_dir: &Path,
    report: &mut String,
) -> anyhow::Result<()> {
    writeln!(report, "### Connection end → enriched record, live agent\n")?;
    writeln!(
        report,
        "The release flowlog-sidecar (Kafka output, defaults: host partitioning, linger.ms=500, \
         a flow's end record held 300 ms for a late reset, ring buffer drained every 100 ms) \
         captures a paced loopback connect/close churn ({} s per load, two records per \
         connection) into a {}-partition flows.raw; one flowlog-enricher (unpinned, defaults, \
         Parquet on) writes flows.enriched; a consumer here reads flows.enriched and takes, per \
         record of the load, its read time minus the flow's end_ns (an upper bound of \"end → \
         acknowledged\"). The enricher's own histogram (end → its write acknowledged) beside it, \
         and how many of the agent's records the broker had acknowledged by the end (the rest \
         still in its spool: the broker could not keep up).\n",
        args.duration.as_secs(),
        args.partitions
    )?;
    writeln!(
        report,
        "| offered | connections | records read | p50 | p99 | max | enricher histogram ≤ 1 s / ≤ 2 s | agent records / acknowledged by the broker (per s of the run) | agent CPU | enricher CPU | target p99 ≤ {MAX_P99_SECONDS} s |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for rate in &args.rates {
        let run = latency::measure(
            &args.brokers,
            sidecar,
            enricher,
            static_file,
            work_dir,
            args.partitions,
            *rate,
            args.duration,
        )?;
        eprintln!(
            "latency at {rate} conn/s: {} records, p50 {:.3} s, p99 {:.3} s (agent records {})",
            run.records,
            run.quantile(0.5),
            run.quantile(0.99),
            run.agent_records
        );
        writeln!(
            report,
            "| {:.0} records/s | {} | {} | {:.3} s | **{:.3} s** | {:.3} s | {:.1}% / {:.1}% | {:.0} / {:.0} ({:.0}/s) | {:.1}% | {:.1}% | {} |",
            2.0 * run.rate,
            run.connections,
            run.records,
            run.quantile(0.5),
            run.quantile(0.99),
            run.quantile(1.0),
            100.0 * run.acked_within_1s,
            100.0 * run.acked_within_2s,
            run.agent_records,
            run.agent_acked,
            run.agent_acked / run.elapsed,
            run.agent_cpu_pct,
            run.enricher_cpu_pct,
            if run.quantile(0.99) <= MAX_P99_SECONDS && run.records >= 2 * run.connections {
                "met"
            } else {
                "**MISSED**"
            }
        )?;
    }
    writeln!(report)?;
    Ok(())
}
