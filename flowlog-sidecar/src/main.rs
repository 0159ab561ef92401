//! `flowlog-sidecar`: records every TCP flow of this host from kernel tracepoints.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, str::FromStr, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use flowlog_sidecar::{
    agent::{self, AgentSettings},
    metrics,
    probe::{Probe, ProbeSettings},
    sink::JsonLines,
};

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Output {
    /// JSON lines on stdout.
    Jsonl,
    /// JSON lines appended to a file.
    File(PathBuf),
    /// Confluent-framed Avro messages to a Kafka topic.
    #[cfg(feature = "kafka")]
    Kafka,
}

impl FromStr for Output {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jsonl" => Ok(Output::Jsonl),
            #[cfg(feature = "kafka")]
            "kafka" => Ok(Output::Kafka),
            #[cfg(not(feature = "kafka"))]
            "kafka" => Err("this flowlog-sidecar was built without the Kafka output \
                 (cargo feature `kafka`)"
                .to_string()),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Output::File(PathBuf::from(path))),
                _ => Err(format!(
                    "`{s}` is not an output: use `jsonl`, `file:PATH` or `kafka`"
                )),
            },
        }
    }
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("`{s}`: {e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} must be a power of two of at least 4096"));
    }
    Ok(n)
}

/// Records every TCP connection of this host, exact to the byte, from kernel tracepoints.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where flow records go: `jsonl` (stdout), `file:PATH` (JSON lines appended to PATH) or
    /// `kafka` (Avro messages to `--kafka-topic`; builds with the cargo feature `kafka`).
    #[arg(long, env = "FLOWLOG_OUTPUT", default_value = "jsonl")]
    output: Output,
    /// A flow open this long gets an interim record (with deltas) each interval.
    #[arg(long, env = "FLOWLOG_INTERIM", default_value = "60s", value_parser = flowlog_cli::parse_duration)]
    interim: Duration,
    /// Listener for Prometheus metrics (/metrics) and the health probes (/healthz: the event
    /// loop turns; /readyz: programs attached and the ring buffer drained recently).
    #[arg(long, env = "FLOWLOG_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Name of this host in records (default: the kernel's hostname).
    #[arg(long, env = "FLOWLOG_HOST")]
    host: Option<String>,
    /// Open sockets tracked at once (kernel LRU map size).
    #[arg(long, env = "FLOWLOG_MAX_FLOWS", default_value_t = 131_072)]
    max_flows: u32,
    /// Kernel ring buffer size in bytes (power of two).
    #[arg(long, env = "FLOWLOG_RING_BUFFER_BYTES", default_value = "4194304", value_parser = parse_ring_bytes)]
    ring_buffer_bytes: u32,
    /// Where tracefs is mounted (default: /sys/kernel/tracing or /sys/kernel/debug/tracing).
    #[arg(long, env = "FLOWLOG_TRACEFS")]
    tracefs: Option<PathBuf>,
    /// The running kernel's BTF, for `struct tcp_sock` offsets.
    #[arg(long, env = "FLOWLOG_BTF", default_value = "/sys/kernel/btf/vmlinux")]
    btf: PathBuf,
    /// Read kernel structures with probe reads only (the plain raw tracepoint for socket state
    /// changes) even where the kernel allows typed pointers (a BTF-typed tracepoint with direct
    /// loads, cheaper per connection). Records are the same either way; without this flag the
    /// agent falls back by itself when the kernel refuses the typed programs.
    #[arg(long, env = "FLOWLOG_PROBE_READS")]
    probe_reads: bool,
    /// Do not adopt the connections already open when the programs are attached. By default
    /// they are tracked from then on and reported like any flow, their records marked
    /// `adopted` (start = adoption time; the first record counts everything since they opened).
    #[arg(long, env = "FLOWLOG_NO_ADOPT")]
    no_adopt: bool,
    /// How often the ring buffer is drained when the kernel has not woken the agent.
    #[arg(long, env = "FLOWLOG_DRAIN_INTERVAL", default_value = "100ms", value_parser = flowlog_cli::parse_duration)]
    drain_interval: Duration,
    #[cfg(feature = "kafka")]
    #[command(flatten)]
    kafka: kafka_output::KafkaFlags,
    /// Directory on bpffs where the kernel state is pinned, so that the programs keep tracking
    /// while no agent runs and the next agent takes over every open flow (its flow_id, seq and
    /// exact sums). Empty: run unpinned (a stop reports open flows as `open`, and a restart
    /// loses them). Without a writable bpffs the agent says so and runs unpinned.
    #[arg(long, env = "FLOWLOG_PIN_DIR", default_value = "/sys/fs/bpf/flowlog")]
    pin_dir: String,
    /// Final stop: take over the pinned kernel state, write what waits in it and every open
    /// flow as an `open` record, detach the programs, remove the pins and exit.
    #[arg(long, env = "FLOWLOG_UNPIN")]
    unpin: bool,
}

/// The output of `--output`, opened. The agent's loop is generic over its sink (no dynamic
/// dispatch per batch), so each kind is its own variant (the Kafka sink, large, boxed).
enum Sink {
    Stdout(JsonLines<std::io::Stdout>),
    File(JsonLines<std::fs::File>),
    #[cfg(feature = "kafka")]
    Kafka(Box<flowlog_sidecar::kafka::KafkaSink>),
}

async fn run(args: Args) -> anyhow::Result<()> {
    let pin_dir = (!args.pin_dir.is_empty()).then(|| PathBuf::from(&args.pin_dir));
    if args.unpin {
        match &pin_dir {
            Some(dir) if dir.exists() => {}
            Some(dir) => {
                tracing::info!(pin_dir = %dir.display(), "nothing is pinned: nothing to do");
                return Ok(());
            }
            None => flowlog_cli::usage_error::<Args>("--unpin needs a --pin-dir".to_string()),
        }
    }
    let signal = agent::shutdown_signal().context("installing the signal handlers")?;
    // A final stop (`--unpin`) stops as soon as it has started: its shutdown does the work.
    let unpin = args.unpin;
    let shutdown = async move {
        if !unpin {
            signal.await;
        }
    };
    let health = flowlog_cli::Health::new(agent::STALL_LIMIT);
    health.expect(
        agent::PROGRAMS_ATTACHED,
        "starting: loading the kernel programs",
    );
    metrics::serve(args.metrics_addr, health.clone()).await?;
    // Opened before the kernel probe starts: a configuration error should cost nothing.
    let sink = match &args.output {
        Output::Jsonl => Sink::Stdout(JsonLines::stdout()),
        Output::File(path) => Sink::File(JsonLines::file(path)?),
        #[cfg(feature = "kafka")]
        Output::Kafka => Sink::Kafka(Box::new(args.kafka.sink()?)),
    };
    let probe = Probe::start_with(
        &ProbeSettings {
            tracefs: args.tracefs,
            btf: args.btf,
            interim: args.interim,
            max_flows: args.max_flows,
            ring_buffer_bytes: args.ring_buffer_bytes,
            drain_interval: args.drain_interval,
            pin_dir,
            adopt: !args.no_adopt,
        },
        args.probe_reads,
    )
    .context("starting the kernel probe")?;
    let settings = AgentSettings {
        host: args.host.unwrap_or_else(agent::hostname),
        interim: args.interim,
        drain_interval: args.drain_interval,
        health,
        unpin: args.unpin,
    };
    match sink {
        Sink::Stdout(sink) => agent::run(probe, sink, settings, shutdown).await,
        Sink::File(sink) => agent::run(probe, sink, settings, shutdown).await,
        #[cfg(feature = "kafka")]
        Sink::Kafka(sink) => agent::run(probe, *sink, settings, shutdown).await,
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    flowlog_cli::main(flowlog_cli::Runtime::CurrentThread, run(args))
}

/// The Kafka output's flags and the sink they make: only in a build with the `kafka` feature,
/// so that a build without it has neither the flags nor librdkafka.
#[cfg(feature = "kafka")]
mod kafka_output {
    use std::path::PathBuf;

    use anyhow::Context as _;
    use flowlog_kafka::ClientSettings;
    use flowlog_sidecar::kafka::{self, KafkaSettings, KafkaSink, KafkaSinkError};

    use super::Args;

    /// The `--output kafka` flags.
    #[derive(Debug, clap::Args)]
    pub struct KafkaFlags {
        /// Kafka bootstrap servers (`--output kafka`) [default: `bootstrap.servers` of
        /// `--kafka-config`, else 127.0.0.1:9092].
        #[arg(long, env = "FLOWLOG_KAFKA_BROKERS")]
        pub kafka_brokers: Option<String>,
        /// A client.properties file of librdkafka options (`key=value` lines, `#` comments) for
        /// every Kafka client of the agent: TLS, SASL, ... `--kafka-option` wins over it.
        #[arg(long, env = "FLOWLOG_KAFKA_CONFIG")]
        pub kafka_config: Option<PathBuf>,
        /// Kafka topic for flow records; it must exist.
        #[arg(long, env = "FLOWLOG_KAFKA_TOPIC", default_value = "flows.raw")]
        pub kafka_topic: String,
        /// A librdkafka producer option, KEY=VALUE, overriding flowlog's defaults; repeatable (the
        /// environment variable takes a comma-separated list).
        #[arg(long = "kafka-option", env = "FLOWLOG_KAFKA_OPTIONS", value_delimiter = ',', value_parser = flowlog_kafka::parse_option)]
        pub kafka_options: Vec<(String, String)>,
        /// How records are spread over the topic's partitions: `host` (all of this host's records
        /// to the partition Kafka's default partitioner gives the host name: bigger batches, fewer
        /// bytes per record) or `flow` (by flow id and host, over every partition). Either way a
        /// flow's records stay in one partition, in order.
        #[arg(long, env = "FLOWLOG_KAFKA_PARTITIONING", default_value = "host")]
        pub kafka_partitioning: kafka::Partitioning,
        /// Directory of the Kafka spool: every record is written there first and removed once the
        /// broker acknowledged it, so broker outages and agent restarts lose nothing.
        #[arg(long, env = "FLOWLOG_SPOOL_DIR", default_value = kafka::DEFAULT_SPOOL_DIR)]
        pub spool_dir: PathBuf,
        /// Largest size of the Kafka spool in bytes; when full, the newest records are dropped
        /// (counted in flowlog_sidecar_spool_dropped_total).
        #[arg(long, env = "FLOWLOG_SPOOL_MAX_BYTES", default_value_t = kafka::DEFAULT_SPOOL_MAX_BYTES)]
        pub spool_max_bytes: u64,
        /// Schema-registry id of schemas/flow_record.v2.avsc, written in every Kafka message.
        #[arg(long, env = "FLOWLOG_SCHEMA_ID", default_value_t = flowlog_record::avro::DEFAULT_SCHEMA_ID)]
        pub schema_id: u32,
    }

    impl KafkaFlags {
        /// The Kafka sink, or the process exits: a `--kafka-config` file that cannot be used and
        /// a rejected librdkafka option are usage errors (exit 2).
        pub fn sink(&self) -> anyhow::Result<KafkaSink> {
            let client = flowlog_cli::usage_checked::<Args, _, _>(
                "'--kafka-config' (FLOWLOG_KAFKA_CONFIG)",
                ClientSettings::load(self.kafka_brokers.as_deref(), self.kafka_config.as_deref()),
            );
            let mut settings = KafkaSettings::new(client, &self.kafka_topic);
            settings.schema_id = self.schema_id;
            settings.options = self.kafka_options.clone();
            settings.spool_dir = self.spool_dir.clone();
            settings.spool_max_bytes = self.spool_max_bytes;
            settings.partitioning = self.kafka_partitioning;
            match KafkaSink::connect(settings) {
                Ok(sink) => Ok(sink),
                Err(e @ KafkaSinkError::Option(_)) => flowlog_cli::usage_error::<Args>(format!(
                    "invalid value for '--kafka-option' (FLOWLOG_KAFKA_OPTIONS): {e}"
                )),
                Err(e) => Err(e).context("starting the Kafka output"),
            }
        }
    }
}
