//! `flowlog-inventory`: watches the inventories once (static files, this host, Kubernetes, EC2)
//! and publishes their ownership tenures to the compacted `flows.ownership` topic, which every
//! `flowlog-enricher --ownership-topic` replica follows — so API servers are not watched once per
//! replica. Run one, or several with `--leader-election`: they elect a leader on a
//! `coordination.k8s.io/v1` Lease (`flowlog_kubernetes::election`), and only the leader runs the
//! sources and publishes.
//!
//! A standby neither watches nor reads the topic: it only reads the Lease every retry period.
//! When it becomes the leader it replays the topic then (the previous leader has stopped by
//! then, so the replay sees everything it published) and starts the sources. A warm follower of
//! the topic would save only that replay of a compacted topic — seconds — and would still have to
//! read to the end after taking over.
//!
//! A leader that cannot renew the Lease before its renew deadline ends the process at once
//! (exit 1) from a thread of its own, whatever the async runtime is doing: nothing it queued can
//! reach the topic after another replica may have taken over, and Kubernetes restarts it as a
//! standby. On SIGTERM the leader stops its sources, waits for what it sent to be acknowledged,
//! then releases the Lease so that a standby takes over at its next look (within a retry period).
//!
//! `/healthz` answers whether the main loop beats; `/readyz` whether this replica does its job:
//! a leader once every source's first complete view (its first watermark) has been published and
//! a publish was acknowledged recently, a standby while it reads the Lease successfully.
//!
//! Modules: [`publisher`] (the replay of the topic, the sources and the publishing, with their
//! readiness) and [`election`] (standing by, leading and handing over); this file parses the flags
//! and wires them.
mod election;
mod publisher;

use std::{future::Future, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use flowlog_cli::Health;
use flowlog_enricher::{metrics as m, source_flags::SourceFlags};
use flowlog_kafka::ClientSettings;
use metrics::gauge;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    election::{ElectionFlags, lead},
    publisher::{Publisher, publish_window},
};

/// `/healthz` fails when the main loop has not beaten for this long (it beats every second).
const STALL_AFTER: Duration = Duration::from_secs(30);

/// Publishes who owned which address, when, to the flows.ownership topic.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: flowlog_cli::ConfigFile,
    /// Kafka bootstrap servers [default: `bootstrap.servers` of `--kafka-config`, else
    /// 127.0.0.1:9092].
    #[arg(long, env = "FLOWLOG_KAFKA_BROKERS")]
    brokers: Option<String>,
    /// A client.properties file of librdkafka options (`key=value` lines, `#` comments) for
    /// every Kafka client of the inventory (its publisher and the replay at start): TLS, SASL, ...
    #[arg(long, env = "FLOWLOG_KAFKA_CONFIG")]
    kafka_config: Option<PathBuf>,
    /// The ownership topic (one partition, `cleanup.policy=compact`); it must exist.
    #[arg(
        long,
        env = "FLOWLOG_OWNERSHIP_TOPIC",
        default_value = "flows.ownership"
    )]
    ownership_topic: String,
    #[command(flatten)]
    sources: SourceFlags,
    /// Closed tenures older than this are deleted from the topic (tombstones).
    #[arg(long, env = "FLOWLOG_RETENTION", default_value = "6h", value_parser = flowlog_cli::parse_duration_or_zero)]
    retention: Duration,
    /// Listener for /metrics, /healthz and /readyz.
    #[arg(long, env = "FLOWLOG_METRICS_ADDR", default_value = "127.0.0.1:9466")]
    metrics_addr: SocketAddr,
    #[command(flatten)]
    election: ElectionFlags,
}

/// Runs `work` while beating `health` every second: the main loop's liveness.
async fn beating<T>(health: &Health, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => health.beat(),
        }
    }
}

async fn run(args: Args, kafka: ClientSettings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    flowlog_enricher::inventory::cancel_on_signal(shutdown.clone())?;
    let health = Health::new(STALL_AFTER);
    let addr = flowlog_enricher::metrics::serve(args.metrics_addr, health.clone()).await?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    let election = match args.election.leader_election {
        true => Some(args.election.config()?),
        false => None,
    };
    let client = match election.is_some() || args.sources.kubernetes.wanted() {
        true => Some(args.sources.kubernetes.client().await?),
        false => None,
    };
    let mut sources = args.sources.sources_but_kubernetes().await?;
    sources.extend(args.sources.kubernetes.source(client.clone()).await?);
    anyhow::ensure!(
        !sources.is_empty(),
        "no inventory source: give --static, --host-source, --ec2 or --kubernetes"
    );
    let publisher = Publisher {
        client: kafka,
        topic: args.ownership_topic.clone(),
        retention: args.retention,
        window: publish_window(&args.sources),
        health: health.clone(),
        shutdown: shutdown.clone(),
    };
    let (Some(config), Some(client)) = (election, client) else {
        gauge!(m::INVENTORY_LEADER).set(1.0);
        return beating(&health, publisher.run(sources)).await;
    };
    lead(config, client, publisher, sources, &health, &shutdown).await
}

fn main() -> ExitCode {
    let args: Args = flowlog_cli::parse_with_config_file();
    let client = flowlog_cli::usage_checked::<Args, _, _>(
        "'--kafka-config' (FLOWLOG_KAFKA_CONFIG)",
        ClientSettings::load(args.brokers.as_deref(), args.kafka_config.as_deref()),
    );
    flowlog_cli::main(flowlog_cli::Runtime::Workers(2), run(args, client))
}
