//! `flowlog`: the whole product on one host with no infrastructure. Captures this host's TCP
//! flows (the agent's library, in-process), attributes both ends with this host's own inventory
//! (its addresses, its cgroups, optional static CIDR files), writes Parquet files under
//! `./flowlogs/` (hive partitions `dt=YYYY-MM-DD/hour=HH/`), and prints a live summary.
//! Ctrl-C (or SIGTERM) reports the flows still open, attributes what is held and closes the
//! files. `flowlog report …` (feature `report`, on by default) answers from those files.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use flowlog_enricher::{
    inventory::Inventory,
    storage::{ParquetSettings, ParquetSink, S3Options},
};
use flowlog_identity::{CgroupResolver, HostSource, InventorySource, StaticSource, cgroup2_mount};
use flowlog_sidecar::{
    agent::{self, AgentSettings},
    metrics,
    probe::{Probe, ProbeSettings},
};
use tokio_util::sync::CancellationToken;

mod enriching_sink;
#[cfg(feature = "report")]
mod report;
mod summary;

/// How often the host's addresses and the static files are checked. Each check is also the
/// source's watermark, so it must be well under `--hold`: flows newer than the last check wait.
const INVENTORY_INTERVAL: Duration = Duration::from_secs(1);
/// How often the capture's ring buffer is drained (the agent's own default).
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// Records every TCP connection of this host with who was on each end, into Parquet files.
#[derive(Debug, Parser)]
#[command(version, about)]
#[cfg_attr(
    feature = "report",
    command(after_help = "Reports over the files written: flowlog report --help")
)]
struct Args {
    /// Where Parquet files go: a directory, `file:///dir` or `s3://bucket/prefix`.
    #[arg(long, env = "FLOWLOG_OUT", default_value = "flowlogs")]
    out: String,
    /// A static inventory file (TOML: CIDR → identity, optional validity times); repeatable.
    #[arg(long = "static", env = "FLOWLOG_STATIC", value_delimiter = ',')]
    static_files: Vec<PathBuf>,
    /// How often the live summary is printed.
    #[arg(long, env = "FLOWLOG_SUMMARY_INTERVAL", default_value = "5s", value_parser = flowlog_cli::parse_duration)]
    summary_interval: Duration,
    /// A flow open this long gets an interim record (with deltas) each interval.
    #[arg(long, env = "FLOWLOG_INTERIM", default_value = "60s", value_parser = flowlog_cli::parse_duration)]
    interim: Duration,
    /// A Parquet file is closed (and visible) when its first record is this old...
    #[arg(long, env = "FLOWLOG_ROLL_INTERVAL", default_value = "60s", value_parser = flowlog_cli::parse_duration)]
    roll_interval: Duration,
    /// ...or when it reaches this many bytes.
    #[arg(long, env = "FLOWLOG_ROLL_BYTES", default_value_t = 128 << 20)]
    roll_bytes: u64,
    /// Longest a flow newer than the inventory waits for it.
    #[arg(long, env = "FLOWLOG_HOLD", default_value = "5s", value_parser = flowlog_cli::parse_duration)]
    hold: Duration,
    /// Listener for Prometheus metrics (/metrics) and the health probes (/healthz, /readyz).
    #[arg(long, env = "FLOWLOG_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Name of this host in records (default: the kernel's hostname).
    #[arg(long, env = "FLOWLOG_HOST")]
    host: Option<String>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let signal = agent::shutdown_signal().context("installing the signal handlers")?;
    let health = flowlog_cli::Health::new(agent::STALL_LIMIT);
    health.expect(
        agent::PROGRAMS_ATTACHED,
        "starting: loading the kernel programs",
    );
    metrics::serve(args.metrics_addr, health.clone()).await?;
    let host = args.host.clone().unwrap_or_else(agent::hostname);
    let parquet = ParquetSink::open(ParquetSettings {
        url: args.out.clone(),
        roll_bytes: args.roll_bytes,
        roll_interval: args.roll_interval,
        s3: S3Options::default(),
    })
    .await
    .with_context(|| format!("opening the output {}", args.out))?;

    let host_source = HostSource::with_hostname(host.clone(), INVENTORY_INTERVAL);
    let mut sources: Vec<Box<dyn InventorySource>> = vec![Box::new(host_source)];
    for path in &args.static_files {
        let source = StaticSource::open(path, INVENTORY_INTERVAL)
            .with_context(|| format!("loading the static inventory {}", path.display()))?;
        sources.push(Box::new(source));
    }
    let stop_inventory = CancellationToken::new();
    let inventory = Inventory::start(sources, Duration::from_secs(6 * 3600), &stop_inventory);
    let cgroup_root = cgroup2_mount().context("no cgroup v2 hierarchy is mounted")?;
    let cgroups = Arc::new(CgroupResolver::new(cgroup_root, host.clone()));

    let probe = Probe::start(&ProbeSettings {
        tracefs: None,
        btf: PathBuf::from("/sys/kernel/btf/vmlinux"),
        interim: args.interim,
        max_flows: 131_072,
        ring_buffer_bytes: 4 << 20,
        drain_interval: DRAIN_INTERVAL,
        // One process for a host's look at itself: its Ctrl-C reports the flows still open.
        pin_dir: None,
        // The connections already open are part of the host's picture.
        adopt: true,
    })
    .context("starting the kernel probe")?;
    let summary = summary::Summary::new(args.summary_interval, Box::new(std::io::stdout()));
    let sink = enriching_sink::EnrichingSink::new(
        inventory.index.clone(),
        cgroups,
        args.hold,
        parquet,
        args.out.clone(),
        summary,
    );
    let settings = AgentSettings {
        host,
        interim: args.interim,
        drain_interval: DRAIN_INTERVAL,
        health,
        unpin: false,
    };
    let result = agent::run(probe, sink, settings, signal).await;
    stop_inventory.cancel();
    inventory.stopped().await;
    result
}

fn main() -> ExitCode {
    #[cfg(feature = "report")]
    if std::env::args_os().nth(1).is_some_and(|a| a == "report") {
        return report::main();
    }
    let args = Args::parse();
    flowlog_cli::main(flowlog_cli::Runtime::Workers(1), run(args))
}
