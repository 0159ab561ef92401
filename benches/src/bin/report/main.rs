//! `report`: how long `flowlog report` (DataFusion) takes against DuckDB running the shipped
//! SQL (`analysis/duckdb/`) on the same Parquet files, in one run. Not a test; results and how
//! to read them are in `benches/RESULTS.md`.
//!
//! The data: `--connections` TCP connections between the pods of a fleet over six hours, each
//! written as the enricher writes it (`ParquetSink`, hourly hive partitions): both ends of a
//! connection inside the fleet (the client's outbound flow and the server's inbound one,
//! mirrored), one end of a failed connect and of egress to outside addresses. Each report is
//! run over the whole six hours and over one hour in the middle (the window a dashboard asks
//! for, where `flowlog report` reads only that hour's partitions and their margin), by each
//! engine pinned to one core (`--cpu`) writing its rows to a CSV file, `--rounds` times,
//! interleaved; the medians of wall
//! time and of CPU time (the child's user + system) are reported with their ratio, and the row
//! counts, which must agree.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use flowlog_enricher::storage::{ParquetSettings, ParquetSink};
use flowlog_record::{
    enriched::{Endpoint, EnrichedFlow, Identity, IdentityKind, Workload},
    record::{Direction, FlowRecord, Outcome},
};

/// `flowlog report` against DuckDB on the same files.
#[derive(Debug, Parser)]
struct Args {
    /// The release build of the one-host `flowlog` (with its default `report` feature).
    #[arg(long)]
    flowlog: PathBuf,
    /// Connections in the data set (about 1.9 flow records each).
    #[arg(long, default_value_t = 1_000_000)]
    connections: u64,
    /// Runs of each (report, window, engine).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The CPU both engines are pinned to (`taskset`): one core each, as the issue asks; both
    /// size their thread pools from the affinity mask.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Where the data set and outputs go (default: a new directory under the temp dir, removed
    /// at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Which code is measured (a commit), printed in the report.
    #[arg(long, default_value = "unknown")]
    revision: String,
}

/// The six hours of the data set start here (2026-12-07T00:00:00Z).
const T0_NS: u64 = 1_796_601_600_000_000_000;
const HOUR_NS: u64 = 3_600_000_000_000;
const HOURS: u64 = 6;
const PODS: u64 = 2_000;
const WORKLOADS: u64 = 40;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pod(i: u64) -> Arc<Identity> {
    let workload = format!("svc{}", i % WORKLOADS);
    Arc::new(Identity {
        kind: IdentityKind::Pod,
        name: format!("{workload}-7d9f8-{i:05}"),
        namespace: Some(format!("ns{}", i % 8)),
        workload: Some(Workload {
            kind: "Deployment".into(),
            name: workload.clone(),
        }),
        labels: BTreeMap::from([("app".to_string(), workload)]),
        node: Some(format!("node-{}", i % 200)),
        zone: Some(format!("eu-west-1{}", ["a", "b", "c"][(i % 3) as usize])),
        region: Some("eu-west-1".into()),
        source: "kubernetes".into(),
        ..Identity::default()
    })
}

fn pod_addr(i: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8))
}

/// The data set's flow records, in end order (as the enricher would write them).
fn flows(connections: u64) -> Vec<EnrichedFlow> {
    let mut rng = Rng(0x5eed_f10e_1060_0001);
    let pods: Vec<Arc<Identity>> = (0..PODS).map(pod).collect();
    let mut out = Vec::with_capacity(connections as usize * 2);
    for i in 0..connections {
        let start_ns = T0_NS + rng.below(HOURS * HOUR_NS - 10_000_000_000);
        let end_ns = start_ns + 1_000_000 + rng.below(5_000_000_000);
        let client = rng.below(PODS);
        // A service talks to a few others: the pair count stays in the thousands.
        let server = (client * 7 + rng.below(5) * 131) % PODS;
        let port = [443, 80, 5432, 6379, 9092][(server % 5) as usize];
        let client_port = 32_768 + rng.below(28_000) as u16;
        let kind = rng.below(100);
        let outcome = match kind {
            0..=2 => Outcome::Failed,
            3..=5 => Outcome::Reset,
            _ => Outcome::Closed,
        };
        let egress = kind >= 95;
        let (up, down) = if outcome == Outcome::Failed {
            (0, 0)
        } else {
            (rng.below(20_000), rng.below(2_000_000))
        };
        let server_addr = if egress {
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, (server % 250) as u8))
        } else {
            pod_addr(server)
        };
        let base = FlowRecord {
            seq: 0,
            start_ns,
            end_ns,
            outcome,
            srtt_us: 200 + rng.below(3_000) as u32,
            min_rtt_us: 100 + rng.below(500) as u32,
            ..FlowRecord::default()
        };
        let client_flow = FlowRecord {
            flow_id: i * 2,
            host: format!("node-{}", client % 200),
            local_addr: pod_addr(client),
            local_port: client_port,
            remote_addr: server_addr,
            remote_port: port,
            direction: Direction::Outbound,
            bytes_sent: up,
            bytes_received: down,
            segs_sent: 3 + up / 1_400,
            segs_received: 3 + down / 1_400,
            retransmits: rng.below(50) / 48,
            resets_received: u64::from(outcome == Outcome::Reset),
            ..base.clone()
        };
        let remote = if egress {
            Endpoint::unknown()
        } else {
            Endpoint::exact(pods[server as usize].clone())
        };
        out.push(EnrichedFlow {
            flow: client_flow,
            local: Endpoint::exact(pods[client as usize].clone()),
            remote,
            enriched_ns: end_ns + 300_000_000,
        });
        if egress || outcome == Outcome::Failed {
            continue;
        }
        out.push(EnrichedFlow {
            flow: FlowRecord {
                flow_id: i * 2 + 1,
                host: format!("node-{}", server % 200),
                start_ns: start_ns + 150_000,
                end_ns: end_ns + 100_000,
                local_addr: pod_addr(server),
                local_port: port,
                remote_addr: pod_addr(client),
                remote_port: client_port,
                direction: Direction::Inbound,
                bytes_sent: down,
                bytes_received: up,
                segs_sent: 3 + down / 1_400,
                segs_received: 3 + up / 1_400,
                resets_sent: u64::from(outcome == Outcome::Reset),
                ..base
            },
            local: Endpoint::exact(pods[server as usize].clone()),
            remote: Endpoint::exact(pods[client as usize].clone()),
            enriched_ns: end_ns + 300_000_000,
        });
    }
    out.sort_by_key(|f| f.flow.end_ns);
    out
}

/// Writes the data set under `dir` as the enricher does; returns (records, files, bytes).
fn write(dir: &Path, flows: &[EnrichedFlow]) -> anyhow::Result<(u64, u64, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut sink = ParquetSink::open(ParquetSettings {
            roll_interval: Duration::from_secs(24 * 3600),
            ..ParquetSettings::new(dir.to_str().context("work dir is not UTF-8")?)
        })
        .await?;
        for chunk in flows.chunks(10_000) {
            for f in chunk {
                sink.write(f)?;
            }
            sink.maybe_roll(std::time::Instant::now()).await?;
        }
        sink.roll().await?;
        anyhow::Ok(())
    })?;
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += e.metadata()?.len();
            }
        }
    }
    Ok((flows.len() as u64, files, bytes))
}

/// One run of one engine: wall time, the child's CPU time, rows written.
#[derive(Debug, Clone, Copy)]
struct Run {
    wall: Duration,
    cpu: Duration,
    rows: u64,
}

/// CPU time (user + system) of the children this process has waited for.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn timed(mut command: Command, out: &Path) -> anyhow::Result<Run> {
    let cpu = children_cpu();
    let start = Instant::now();
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let wall = start.elapsed();
    let cpu = children_cpu() - cpu;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // CSV with a header line; no field of these reports holds a line break.
    let text = fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    let rows = text.lines().count().saturating_sub(1) as u64;
    Ok(Run { wall, cpu, rows })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.rounds > 0, "--rounds must be positive");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (work, remove) = match &args.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("flowlog-bench-report-{}", std::process::id())),
            true,
        ),
    };
    let data = work.join("flowlogs");
    fs::create_dir_all(&work)?;
    // The shipped DuckDB report, its rows written with DuckDB's own COPY to a CSV file (as
    // `flowlog report --format csv` writes them).
    let script = root.join("flowlog-testkit/sql_report.py");

    eprintln!("[report] generating {} connections", args.connections);
    let flows = flows(args.connections);
    let (records, files, bytes) = write(&data, &flows)?;
    drop(flows);
    eprintln!("[report] {records} records in {files} files, {bytes} bytes");

    let windows = [
        ("6 h (all)", T0_NS, T0_NS + HOURS * HOUR_NS),
        ("1 h", T0_NS + 3 * HOUR_NS, T0_NS + 4 * HOUR_NS),
    ];
    let reports = ["connections", "availability", "audit", "capacity"];
    let glob = format!("{}/**/*.parquet", data.display());
    let mut results: BTreeMap<(usize, usize), [Vec<Run>; 2]> = BTreeMap::new();
    for round in 0..args.rounds {
        for (w, (wname, from, to)) in windows.iter().enumerate() {
            for (r, report) in reports.iter().enumerate() {
                let out = work.join(format!("{report}.csv"));
                let mut flowlog = Command::new("taskset");
                flowlog
                    .args(["-c", &args.cpu.to_string()])
                    .arg(&args.flowlog)
                    .args([
                        "report",
                        report,
                        "--format",
                        "csv",
                        "--skew",
                        "1s",
                        "--price-per-gb",
                    ])
                    .args(["0.01", "--data"])
                    .arg(&data)
                    .args(["--from", &from.to_string(), "--to", &to.to_string()])
                    .stdout(fs::File::create(&out)?);
                let ours = timed(flowlog, &out)?;
                let mut duckdb = Command::new("taskset");
                duckdb
                    .args(["-c", &args.cpu.to_string(), "python3"])
                    .arg(&script)
                    .arg("--csv")
                    .arg(&out)
                    .arg("duckdb")
                    .arg(root.join("analysis/duckdb/views.sql"))
                    .arg(root.join(format!("analysis/duckdb/{report}.sql")))
                    .arg(&glob)
                    .args([
                        "skew_ns=1000000000".to_string(),
                        format!("from_ns={from}"),
                        format!("to_ns={to}"),
                        "price_per_gb=0.01".to_string(),
                    ]);
                let theirs = timed(duckdb, &out)?;
                eprintln!(
                    "[report] round {} {report} over {wname}: flowlog {:.2} s, DuckDB {:.2} s, \
                     rows {} / {}",
                    round + 1,
                    ours.wall.as_secs_f64(),
                    theirs.wall.as_secs_f64(),
                    ours.rows,
                    theirs.rows
                );
                let entry = results.entry((w, r)).or_default();
                entry[0].push(ours);
                entry[1].push(theirs);
            }
        }
    }
    if remove {
        let _ = fs::remove_dir_all(&work);
    }

    println!(
        "\n## `flowlog report` against DuckDB on the same Parquet files\n\n\
         flowlog {}; {} connections → {records} flow records in {files} files ({bytes} bytes), \
         six hourly partitions; {} rounds, medians; both engines pinned to CPU {}. Wall time and CPU time (user + system of \
         the process) per report, each engine writing its rows to a CSV file; DuckDB runs the \
         shipped `analysis/duckdb/` SQL from Python (`duckdb` {}). Ratios below 1 mean \
         `flowlog report` is faster.\n",
        args.revision,
        args.connections,
        args.rounds,
        args.cpu,
        duckdb_version()
    );
    println!(
        "| report | window | rows (flowlog / DuckDB) | flowlog wall | DuckDB wall | wall ratio | \
         flowlog CPU | DuckDB CPU | CPU ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for ((w, r), [ours, theirs]) in &results {
        let wall = |runs: &[Run]| median(runs.iter().map(|x| x.wall).collect());
        let cpu = |runs: &[Run]| median(runs.iter().map(|x| x.cpu).collect());
        println!(
            "| {} | {} | {} / {} | {:.2} s | {:.2} s | {:.2} | {:.2} s | {:.2} s | {:.2} |",
            reports[*r],
            windows[*w].0,
            ours[0].rows,
            theirs[0].rows,
            wall(ours).as_secs_f64(),
            wall(theirs).as_secs_f64(),
            wall(ours).as_secs_f64() / wall(theirs).as_secs_f64(),
            cpu(ours).as_secs_f64(),
            cpu(theirs).as_secs_f64(),
            cpu(ours).as_secs_f64() / cpu(theirs).as_secs_f64(),
        );
    }
    Ok(())
}

fn duckdb_version() -> String {
    Command::new("python3")
        .args(["-c", "import duckdb; print(duckdb.__version__)"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}
