//! `flowlog-enricher`: one replica of the enricher. Reads `flows.raw` in a consumer group,
//! attributes both ends of every flow as of its start, writes `flows.enriched` and Parquet.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use flowlog_enricher::{
    inventory::Inventory,
    kafka::KafkaSettings,
    metrics,
    ownership::OwnershipTopicSource,
    pipeline::{self, PipelineSettings},
    source_flags::SourceFlags,
    storage::{ParquetSettings, ParquetSink, S3Options},
};
use flowlog_kafka::ClientSettings;
use flowlog_record::{
    avro::{self, SchemaIds},
    enriched_avro,
};
use tokio_util::sync::CancellationToken;

/// Attributes both ends of every flow in `flows.raw` to the workload that owned the address at
/// the flow's start, and writes the result to `flows.enriched` and Parquet files.
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
    /// every Kafka client of the enricher (consumer, producer, ownership topic): TLS, SASL, ...
    /// `--consumer-option` and `--producer-option` win over it.
    #[arg(long, env = "FLOWLOG_KAFKA_CONFIG")]
    kafka_config: Option<PathBuf>,
    /// Topic of flow records.
    #[arg(long, env = "FLOWLOG_INPUT_TOPIC", default_value = "flows.raw")]
    input_topic: String,
    /// Consumer group shared by all enricher replicas.
    #[arg(long, env = "FLOWLOG_GROUP", default_value = "flowlog-enricher")]
    group: String,
    /// Topic of enriched flows; `none` writes Parquet only.
    #[arg(long, env = "FLOWLOG_OUTPUT_TOPIC", default_value = "flows.enriched")]
    output_topic: String,
    /// Dead-letter topic for messages that cannot be decoded.
    #[arg(long, env = "FLOWLOG_DLQ_TOPIC", default_value = "flows.dlq")]
    dlq_topic: String,
    /// Schema-registry id of schemas/flow_record.v2.avsc (ids other than this and
    /// --input-schema-id-v1 are dead letters).
    #[arg(long, env = "FLOWLOG_INPUT_SCHEMA_ID", default_value_t = avro::DEFAULT_SCHEMA_ID)]
    input_schema_id: u32,
    /// Schema-registry id of schemas/flow_record.v1.avsc, which agents before version 2 write.
    #[arg(long, env = "FLOWLOG_INPUT_SCHEMA_ID_V1", default_value_t = avro::DEFAULT_SCHEMA_ID_V1)]
    input_schema_id_v1: u32,
    /// Schema-registry id of schemas/enriched_flow.v2.avsc, written in every enriched message.
    #[arg(long, env = "FLOWLOG_OUTPUT_SCHEMA_ID", default_value_t = enriched_avro::DEFAULT_SCHEMA_ID)]
    output_schema_id: u32,
    /// A librdkafka consumer option, KEY=VALUE; repeatable.
    #[arg(long = "consumer-option", env = "FLOWLOG_CONSUMER_OPTIONS", value_delimiter = ',', value_parser = flowlog_kafka::parse_option)]
    consumer_options: Vec<(String, String)>,
    /// A librdkafka producer option, KEY=VALUE; repeatable.
    #[arg(long = "producer-option", env = "FLOWLOG_PRODUCER_OPTIONS", value_delimiter = ',', value_parser = flowlog_kafka::parse_option)]
    producer_options: Vec<(String, String)>,
    /// Where Parquet files go: a directory, `file:///dir` or `s3://bucket/prefix`; `none` for
    /// none.
    #[arg(long, env = "FLOWLOG_PARQUET", default_value = "none")]
    parquet: String,
    /// A Parquet file is closed when it reaches this many bytes...
    #[arg(long, env = "FLOWLOG_PARQUET_ROLL_BYTES", default_value_t = 128 << 20)]
    parquet_roll_bytes: u64,
    /// ...or when its first record is this old. Offsets are committed only after a roll, so
    /// this is also how much a crash re-reads.
    #[arg(long, env = "FLOWLOG_PARQUET_ROLL_INTERVAL", default_value = "60s", value_parser = flowlog_cli::parse_duration_or_zero)]
    parquet_roll_interval: Duration,
    /// S3-compatible endpoint (MinIO, moto); default AWS.
    #[arg(long, env = "FLOWLOG_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region (default from AWS_REGION, else us-east-1).
    #[arg(long, env = "FLOWLOG_S3_REGION")]
    s3_region: Option<String>,
    /// Allow an http:// S3 endpoint.
    #[arg(long, env = "FLOWLOG_S3_ALLOW_HTTP")]
    s3_allow_http: bool,
    /// Follow this ownership topic (published by `flowlog-inventory`) instead of, or besides,
    /// reading inventories directly.
    #[arg(long, env = "FLOWLOG_OWNERSHIP_TOPIC")]
    ownership_topic: Option<String>,
    #[command(flatten)]
    sources: SourceFlags,
    /// Longest a flow waits for an inventory source that streams its changes before the ends
    /// that source could change are `unknown`; for a source that polls (EC2), the allowance
    /// beyond its poll interval.
    #[arg(long, env = "FLOWLOG_HOLD", default_value = "5s", value_parser = flowlog_cli::parse_duration_or_zero)]
    hold: Duration,
    /// How far the flows' clocks (their hosts') may be from the inventories' clocks: an end is
    /// `exact` only if one owner held the address from start - skew to start + skew, and flows
    /// wait for the inventory up to start + skew.
    #[arg(long, env = "FLOWLOG_CLOCK_SKEW", default_value = "0s", value_parser = flowlog_cli::parse_duration_or_zero)]
    clock_skew: Duration,
    /// How long ownership intervals are kept after they close (the oldest flow start that can
    /// still be attributed).
    #[arg(long, env = "FLOWLOG_RETENTION", default_value = "6h", value_parser = flowlog_cli::parse_duration_or_zero)]
    retention: Duration,
    /// Most input messages read but not yet durable in every output; past it reading pauses
    /// (and open Parquet files close early).
    #[arg(long, env = "FLOWLOG_MAX_PENDING", default_value_t = 500_000)]
    max_pending: usize,
    /// Listener for Prometheus metrics (/metrics) and the health probes (/healthz: the pipeline's
    /// loop turns; /readyz: partitions assigned and the inventory complete to within the hold).
    #[arg(long, env = "FLOWLOG_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    metrics_addr: SocketAddr,
}

async fn run(args: Args, client: ClientSettings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    flowlog_enricher::inventory::cancel_on_signal(shutdown.clone())?;
    let health = flowlog_cli::Health::new(pipeline::STALL_LIMIT);
    pipeline::declare_readiness(&health);
    metrics::serve(args.metrics_addr, health.clone()).await?;
    let parquet = match args.parquet.as_str() {
        "none" => None,
        url => {
            let settings = ParquetSettings {
                url: url.to_string(),
                roll_bytes: args.parquet_roll_bytes,
                roll_interval: args.parquet_roll_interval,
                s3: S3Options {
                    endpoint: args.s3_endpoint.clone(),
                    region: args.s3_region.clone(),
                    allow_http: args.s3_allow_http,
                    ..S3Options::default()
                },
            };
            Some(ParquetSink::open(settings).await?)
        }
    };
    let mut sources = args.sources.sources().await?;
    if let Some(topic) = &args.ownership_topic {
        sources.push(Box::new(OwnershipTopicSource::new(client.clone(), topic)));
    }
    let inventory = Inventory::start(sources, args.retention, &shutdown);
    let mut kafka = KafkaSettings::new(client);
    kafka.input_topic = args.input_topic;
    kafka.group = args.group;
    kafka.output_topic = (args.output_topic != "none").then_some(args.output_topic);
    kafka.dlq_topic = args.dlq_topic;
    kafka.input_schema_ids = SchemaIds {
        v1: args.input_schema_id_v1,
        v2: args.input_schema_id,
    };
    kafka.output_schema_id = args.output_schema_id;
    kafka.consumer_options = args.consumer_options;
    kafka.producer_options = args.producer_options;
    let mut settings = PipelineSettings::new(kafka);
    settings.hold = args.hold;
    settings.clock_skew = args.clock_skew;
    settings.max_pending = args.max_pending;
    settings.health = Some(health);
    let result = pipeline::run(settings, inventory.index.clone(), parquet, shutdown.clone()).await;
    shutdown.cancel();
    inventory.stopped().await;
    Ok(result?)
}

fn main() -> ExitCode {
    let args: Args = flowlog_cli::parse_with_config_file();
    let client = flowlog_cli::usage_checked::<Args, _, _>(
        "'--kafka-config' (FLOWLOG_KAFKA_CONFIG)",
        ClientSettings::load(args.brokers.as_deref(), args.kafka_config.as_deref()),
    );
    flowlog_cli::usage_checked::<Args, _, _>(
        "'--consumer-option' (FLOWLOG_CONSUMER_OPTIONS)",
        flowlog_kafka::check_options(&args.consumer_options),
    );
    flowlog_cli::usage_checked::<Args, _, _>(
        "'--producer-option' (FLOWLOG_PRODUCER_OPTIONS)",
        flowlog_kafka::check_options(&args.producer_options),
    );
    flowlog_cli::main(flowlog_cli::Runtime::Workers(2), run(args, client))
}
