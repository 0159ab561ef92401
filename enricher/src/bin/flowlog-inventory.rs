//! `flowlog-inventory`: watches the inventories once (static files, this host; Kubernetes and
//! EC2 as they are added) and publishes their ownership tenures to the compacted
//! `flows.ownership` topic, which every `flowlog-enricher --ownership-topic` replica follows —
//! so API servers are not watched once per replica. Run one (or one per cluster).
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use flowlog_enricher::{metrics, ownership, source_flags::SourceFlags};
use flowlog_identity::spawn_source;
use flowlog_kafka::ClientSettings;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

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
    /// Prometheus metrics listener (serves /metrics).
    #[arg(long, env = "FLOWLOG_METRICS_ADDR", default_value = "127.0.0.1:9466")]
    metrics_addr: SocketAddr,
}

async fn run(args: Args, client: ClientSettings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    flowlog_enricher::inventory::cancel_on_signal(shutdown.clone())?;
    metrics::install(args.metrics_addr)?;
    let sources = args.sources.sources().await?;
    anyhow::ensure!(
        !sources.is_empty(),
        "no inventory source: give --static, --host-source or --ec2"
    );
    let (replay, topic) = (client.clone(), args.ownership_topic.clone());
    let tenures = tokio::task::spawn_blocking(move || ownership::replay_tenures(&replay, &topic))
        .await?
        .with_context(|| format!("replaying {}", args.ownership_topic))?;
    let (tx, rx) = mpsc::channel(65_536);
    let tasks: Vec<_> = sources
        .into_iter()
        .map(|s| spawn_source(s, tx.clone(), shutdown.clone()))
        .collect();
    drop(tx);
    info!(topic = %args.ownership_topic, sources = tasks.len(), "publishing ownership");
    ownership::publish(&client, &args.ownership_topic, tenures, rx, args.retention)
        .await
        .with_context(|| format!("publishing to {}", args.ownership_topic))?;
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Args = flowlog_cli::parse_with_config_file();
    let client = flowlog_cli::usage_checked::<Args, _, _>(
        "'--kafka-config' (FLOWLOG_KAFKA_CONFIG)",
        ClientSettings::load(args.brokers.as_deref(), args.kafka_config.as_deref()),
    );
    flowlog_cli::main(flowlog_cli::Runtime::Workers(2), run(args, client))
}
