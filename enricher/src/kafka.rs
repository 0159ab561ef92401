//! The enricher's Kafka clients: a consumer in a consumer group on the input topic (N enrichers
//! share its partitions), and one producer for enriched flows and dead letters.
//!
//! - Offsets are **stored by hand** (`enable.auto.offset.store=false`) once a record is durable
//!   in every output ([`crate::offsets`]) and committed by librdkafka's auto-commit, which also
//!   commits the stored offsets when partitions are revoked.
//! - Every produced message carries a [`Token`] (its input partition and offset) as the delivery
//!   opaque; the delivery callback queues a [`Report`] for the pipeline's task. A failed delivery
//!   comes back with its message so that the pipeline produces it again: nothing is dropped.
//! - Client errors (brokers down) are counted by kind and logged once a minute.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use flowlog_kafka::{ClientErrors, ClientSettings, error_kind};
use flowlog_record::{
    avro::{self, SchemaIds},
    enriched_avro,
};
use metrics::gauge;
use rdkafka::{
    ClientContext, Statistics,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    message::{DeliveryResult, OwnedMessage},
    producer::{Producer as _, ProducerContext, ThreadedProducer},
};
use tracing::{info, warn};

use crate::metrics as m;

/// Where the enricher reads and writes.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers` and the `--kafka-config` options, for every client of the process.
    pub client: ClientSettings,
    /// Topic of flow records (`flows.raw`).
    pub input_topic: String,
    /// Consumer group shared by the enricher's replicas.
    pub group: String,
    /// Topic of enriched flows (`flows.enriched`); `None` writes Parquet only.
    pub output_topic: Option<String>,
    /// Dead-letter topic for messages that cannot be decoded (`flows.dlq`).
    pub dlq_topic: String,
    /// Registry ids of `flow_record.v2.avsc` and `flow_record.v1.avsc` (agents before v2):
    /// messages with another id are dead letters.
    pub input_schema_ids: SchemaIds,
    /// Registry id of `enriched_flow.v2.avsc`, written in every enriched message.
    pub output_schema_id: u32,
    /// librdkafka consumer options, applied after (overriding) [`CONSUMER_DEFAULTS`] and the
    /// `--kafka-config` options.
    pub consumer_options: Vec<(String, String)>,
    /// librdkafka producer options, applied after (overriding) [`PRODUCER_DEFAULTS`] and the
    /// `--kafka-config` options.
    pub producer_options: Vec<(String, String)>,
    /// How long the start-up check waits for each topic's metadata.
    pub metadata_timeout: Duration,
}

impl KafkaSettings {
    /// The defaults (`flows.raw` → `flows.enriched`, `flows.dlq`, group `flowlog-enricher`);
    /// `client`: the brokers, or [`ClientSettings`] with the `--kafka-config` options.
    pub fn new(client: impl Into<ClientSettings>) -> Self {
        Self {
            client: client.into(),
            input_topic: "flows.raw".into(),
            group: "flowlog-enricher".into(),
            output_topic: Some("flows.enriched".into()),
            dlq_topic: "flows.dlq".into(),
            input_schema_ids: SchemaIds {
                v1: avro::DEFAULT_SCHEMA_ID_V1,
                v2: avro::DEFAULT_SCHEMA_ID,
            },
            output_schema_id: enriched_avro::DEFAULT_SCHEMA_ID,
            consumer_options: Vec::new(),
            producer_options: Vec::new(),
            metadata_timeout: Duration::from_secs(10),
        }
    }
}

/// Consumer settings unless an option says otherwise: offsets stored by hand and auto-committed
/// every second; a new group starts at the beginning; fetches answered within 10 ms (tansu
/// answers a waiting fetch only when `fetch.wait.max.ms` runs out); lag statistics every 5 s.
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "flowlog-enricher"),
    ("allow.auto.create.topics", "false"),
    ("enable.auto.commit", "true"),
    ("auto.commit.interval.ms", "1000"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("fetch.wait.max.ms", "10"),
    ("statistics.interval.ms", "5000"),
    ("session.timeout.ms", "10000"),
];

/// Producer settings unless an option says otherwise: acknowledged by all in-sync replicas,
/// idempotent, zstd, batched for 20 ms (the end-to-end latency target is p99 ≤ 2 s).
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "flowlog-enricher"),
    ("allow.auto.create.topics", "false"),
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("compression.type", "zstd"),
    ("linger.ms", "20"),
    ("batch.size", "1048576"),
    ("queue.buffering.max.messages", "200000"),
];

/// Which input message a produced message settles, and when its flow ended (for the latency
/// histogram; 0 for dead letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub partition: i32,
    pub offset: i64,
    pub end_ns: u64,
}

/// A delivery report, queued by librdkafka's thread for the pipeline.
#[derive(Debug)]
pub struct Report {
    pub token: Token,
    /// On failure, the message to produce again and the error's kind.
    pub result: Result<(), (String, OwnedMessage)>,
}

/// State shared with librdkafka's threads.
pub struct Shared {
    reports: Mutex<Vec<Report>>,
    revoked: Mutex<Vec<i32>>,
    errors: ClientErrors,
}

impl Shared {
    /// Delivery reports that arrived since the last call.
    pub fn take_reports(&self, into: &mut Vec<Report>) {
        into.append(&mut lock(&self.reports));
    }

    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<i32> {
        std::mem::take(&mut lock(&self.revoked))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The librdkafka client context of both clients.
pub struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.shared.errors.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.errors.report(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        for topic in statistics.topics.values() {
            for p in topic.partitions.values() {
                // -1 is librdkafka's "not known" (partition not assigned, no offsets yet).
                if p.partition >= 0 && p.consumer_lag >= 0 {
                    gauge!(m::CONSUMER_LAG, "partition" => p.partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let parts: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                info!(?parts, "partitions revoked");
                lock(&self.shared.revoked).extend(parts);
            }
            Rebalance::Assign(list) => {
                let parts: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                info!(?parts, "partitions assigned");
            }
            Rebalance::Error(e) => warn!(error = %e, "consumer group rebalance failed"),
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Token>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Box<Token>) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, message)) => Err((error_kind(e), message.detach())),
        };
        lock(&self.shared.reports).push(Report {
            token: *token,
            result,
        });
    }
}

/// Why the Kafka clients could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("creating the Kafka {what} for {brokers}")]
    Create {
        what: &'static str,
        brokers: String,
        source: KafkaError,
    },
    /// librdkafka refused an option of `--consumer-option` or `--producer-option`.
    #[error(transparent)]
    Option(flowlog_kafka::OptionError),
    #[error("subscribing to `{topic}`")]
    Subscribe { topic: String, source: KafkaError },
    #[error(transparent)]
    Topic(#[from] flowlog_kafka::TopicError),
}

/// The consumer (subscribed to the input topic) and the producer, sharing one [`Shared`].
pub struct Clients {
    pub consumer: StreamConsumer<Context>,
    pub producer: ThreadedProducer<Context>,
    pub shared: Arc<Shared>,
}

impl Clients {
    /// Creates both clients, checks that every topic exists and subscribes.
    pub fn connect(settings: &KafkaSettings) -> Result<Self, ClientError> {
        use rdkafka::consumer::Consumer as _;
        let shared = Arc::new(Shared {
            reports: Mutex::default(),
            revoked: Mutex::default(),
            errors: ClientErrors::new(m::KAFKA_ERRORS, &settings.client.brokers, "retrying"),
        });
        let context = || Context {
            shared: Arc::clone(&shared),
        };
        let create_err = |what| {
            move |source| match flowlog_kafka::OptionError::from_kafka(&source) {
                Some(option) => ClientError::Option(option),
                None => ClientError::Create {
                    what,
                    brokers: settings.client.brokers.clone(),
                    source,
                },
            }
        };
        let mut consumer_config = settings
            .client
            .client_config(CONSUMER_DEFAULTS, &settings.consumer_options);
        consumer_config.set("group.id", &settings.group);
        let consumer: StreamConsumer<Context> = consumer_config
            .create_with_context(context())
            .map_err(create_err("consumer"))?;
        let producer_config = settings
            .client
            .client_config(PRODUCER_DEFAULTS, &settings.producer_options);
        let producer: ThreadedProducer<Context> = producer_config
            .create_with_context(context())
            .map_err(create_err("producer"))?;
        let topics = std::iter::once(&settings.input_topic)
            .chain(settings.output_topic.as_ref())
            .chain(std::iter::once(&settings.dlq_topic));
        for topic in topics {
            // The producer's thread serves its events (and so the error callback).
            let partitions = flowlog_kafka::check_topic(
                producer.client(),
                &producer_config,
                topic,
                settings.metadata_timeout,
                &shared.errors,
                || {},
            )?;
            info!(topic, partitions, "topic ready");
        }
        consumer
            .subscribe(&[&settings.input_topic])
            .map_err(|source| ClientError::Subscribe {
                topic: settings.input_topic.clone(),
                source,
            })?;
        Ok(Self {
            consumer,
            producer,
            shared,
        })
    }
}
