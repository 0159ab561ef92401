//! The Kafka output (`--output kafka`): each flow record becomes one message — key
//! [`flowlog_record::avro::key`] (flow id and host, so a flow's records stay in one partition, in
//! order), value the Confluent-framed Avro of [`flowlog_record::avro::encode`] — produced with
//! librdkafka (rdkafka's `ThreadedProducer`: `acks=all`, idempotent, zstd, batched).
//!
//! Guarantees, after Vector's Kafka sink:
//! - **Backpressure, never a drop**: when librdkafka's queue is full, [`KafkaSink::write`] waits
//!   and retries; the agent's loop slows down and the kernel ring buffer absorbs the burst (its
//!   own overflow is counted in the kernel).
//! - **Sent means acknowledged**: a record counts as sent only when its delivery report says the
//!   broker wrote it.
//! - **Failures are kept, not lost**: a record librdkafka gives up on (message timeout, purge at
//!   exit, a non-retriable error) is decoded back from its message and handed to an
//!   [`Undelivered`] keeper, counted and logged. The disk spool (`spool.rs`) plugs in there.
//! - **Bounded flushes**: [`KafkaSink::flush`] waits for outstanding deliveries at most
//!   [`KafkaSettings::flush_wait`], and not at all while the broker makes no progress, so a broker
//!   outage never stalls capture; records stay in flight and librdkafka retries them until
//!   `message.timeout.ms`. Dropping the sink (agent shutdown) waits up to
//!   [`KafkaSettings::shutdown_wait`].
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use flowlog_record::avro;
use metrics::{Counter, Gauge, counter, gauge};
use rdkafka::{
    ClientConfig, ClientContext,
    config::RDKafkaLogLevel,
    error::{KafkaError, RDKafkaErrorCode},
    message::{DeliveryResult, Message},
    producer::{BaseRecord, Producer, ProducerContext, PurgeConfig, ThreadedProducer},
};
use tracing::{debug, error, info, warn};

use crate::{
    metrics as m,
    record::FlowRecord,
    sink::{RecordSink, SinkError},
};

/// Where and how to produce.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    /// Schema-registry id of `schemas/flow_record.v1.avsc`, written in every message's header.
    pub schema_id: u32,
    /// librdkafka options applied after (and so overriding) the defaults of [`PRODUCER_DEFAULTS`].
    pub options: Vec<(String, String)>,
    /// How long the start-up check waits for the cluster's metadata.
    pub metadata_timeout: Duration,
    /// How long a regular flush waits for outstanding deliveries.
    pub flush_wait: Duration,
    /// How long dropping the sink (shutdown) waits for outstanding deliveries.
    pub shutdown_wait: Duration,
}

impl KafkaSettings {
    /// Settings with the defaults for everything but where to produce.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            schema_id: 1,
            options: Vec::new(),
            metadata_timeout: Duration::from_secs(5),
            flush_wait: Duration::from_millis(200),
            shutdown_wait: Duration::from_secs(10),
        }
    }
}

/// Producer settings flowlog uses unless a `--kafka-option` says otherwise: every record
/// acknowledged by all in-sync replicas, no duplicates from retries, zstd, and batches of up to
/// 1 MiB collected for 50 ms (flow records are small; batching is what makes them cheap).
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "flowlog-sidecar"),
    // The topic must exist; a typo must not create a new one on brokers that allow it.
    ("allow.auto.create.topics", "false"),
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("compression.type", "zstd"),
    ("linger.ms", "50"),
    ("batch.size", "1048576"),
    ("batch.num.messages", "100000"),
    ("queue.buffering.max.messages", "500000"),
    ("queue.buffering.max.kbytes", "262144"),
];

/// Why the Kafka output could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// librdkafka rejected an option (unknown name or bad value).
    #[error("librdkafka option `{key}={value}`: {reason}")]
    Option {
        key: String,
        value: String,
        reason: String,
    },
    #[error("creating the Kafka producer for {brokers}")]
    Create { brokers: String, source: KafkaError },
    /// The topic does not exist (topics are not created by the agent).
    #[error("Kafka topic `{topic}` does not exist on {brokers}: create it first")]
    MissingTopic { topic: String, brokers: String },
    #[error("Kafka topic `{topic}` on {brokers} is not usable: {error}")]
    Topic {
        topic: String,
        brokers: String,
        error: String,
    },
}

/// Keeps records that Kafka could not take (librdkafka gave up on them: message timeout, purge
/// at shutdown, a non-retriable error).
///
/// **The disk spool plugs in here**: `spool.rs` (being written) will implement this trait,
/// append the records to its segments and replay them once the broker is back. Until then,
/// [`InMemory`] keeps them in memory, and the sink counts
/// (`flowlog_sidecar_kafka_undelivered_total`) and logs them.
pub trait Undelivered {
    /// Takes records the broker did not acknowledge, in the order their reports arrived.
    fn keep(&mut self, records: Vec<FlowRecord>);
}

/// The keeper until the spool exists: a `Vec` (lost when the process exits; the sink logs how
/// many at that point).
#[derive(Debug, Default)]
pub struct InMemory {
    pub records: Vec<FlowRecord>,
}

impl Undelivered for InMemory {
    fn keep(&mut self, mut records: Vec<FlowRecord>) {
        self.records.append(&mut records);
    }
}

/// State shared with librdkafka's delivery-report thread.
struct Shared {
    /// Messages handed to librdkafka whose delivery report has not arrived.
    in_flight: AtomicU64,
    /// Records whose delivery report said "written" (for progress detection).
    sent: AtomicU64,
    /// Records librdkafka gave up on, decoded from their messages, waiting for the agent's task.
    failed: Mutex<Vec<FlowRecord>>,
    /// The last delivery error, for the log line about undelivered records.
    last_failure: Mutex<Option<String>>,
    broker_errors: Mutex<Throttle>,
    sent_total: Counter,
    bytes_total: Counter,
    queue_depth: Gauge,
}

/// Logs the first occurrence of a condition, then at most once a minute, with a running count.
#[derive(Default)]
struct Throttle {
    count: u64,
    last: Option<Instant>,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(60);

    /// Counts one occurrence; true when it should be logged.
    fn hit(&mut self) -> bool {
        self.count += 1;
        self.due()
    }

    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Self::EVERY)
        {
            self.last = Some(now);
            return true;
        }
        false
    }
}

/// snake_case label of a librdkafka error, e.g. `message_timed_out`.
fn error_kind(e: &KafkaError) -> String {
    let name = match e.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => return "other".to_string(),
    };
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The librdkafka client context: routes delivery reports and client errors into [`Shared`].
struct Context {
    shared: Arc<Shared>,
    brokers: String,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Errors and warnings (connection refused, broker down) also arrive through `error`,
        // which counts them and logs them once a minute; here they would repeat every few
        // seconds. `FLOWLOG_LOG=librdkafka=debug` shows them all.
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                error!(target: "librdkafka", "{fac}: {message}")
            }
            _ => debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = error_kind(&error);
        counter!(m::KAFKA_BROKER_ERRORS, "kind" => kind.clone()).increment(1);
        let mut throttle = self
            .shared
            .broker_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if throttle.hit() {
            warn!(
                brokers = %self.brokers,
                kind,
                count = throttle.count,
                "Kafka brokers unreachable or failing: {reason}; capturing anyway, records stay \
                 queued and are retried until message.timeout.ms"
            );
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let s = &self.shared;
        match result {
            Ok(message) => {
                s.sent.fetch_add(1, Ordering::Relaxed);
                s.sent_total.increment(1);
                let bytes =
                    message.key().map_or(0, <[u8]>::len) + message.payload().map_or(0, <[u8]>::len);
                s.bytes_total.increment(bytes as u64);
            }
            Err((e, message)) => {
                counter!(m::KAFKA_DELIVERY_ERRORS, "kind" => error_kind(e)).increment(1);
                match message.payload().map(avro::decode) {
                    Some(Ok((_, record))) => s
                        .failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(record),
                    // Only this sink produces through this producer, so it cannot happen.
                    other => error!(?other, "undelivered Kafka message is not a flow record"),
                }
                *s.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
        let left = s
            .in_flight
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        s.queue_depth.set(left as f64);
    }
}

/// Flow records to a Kafka topic. See the module docs for its guarantees.
pub struct KafkaSink<U: Undelivered = InMemory> {
    producer: ThreadedProducer<Context>,
    shared: Arc<Shared>,
    settings: KafkaSettings,
    undelivered: U,
    /// Reused buffers for the message being produced.
    key: Vec<u8>,
    value: Vec<u8>,
    /// `sent` when a flush last gave up waiting: while no delivery succeeds after that, flushes
    /// do not wait (the broker is down or stuck; capture must go on).
    stalled_at: Option<u64>,
    undelivered_log: Throttle,
    undelivered_total: u64,
    queue_full_log: Throttle,
}

impl KafkaSink<InMemory> {
    /// Creates the producer and checks the topic (see [`KafkaSink::with_undelivered`]).
    pub fn connect(settings: KafkaSettings) -> Result<Self, KafkaSinkError> {
        Self::with_undelivered(settings, InMemory::default())
    }
}

/// The librdkafka configuration: defaults, brokers, then the user's options.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in PRODUCER_DEFAULTS {
        config.set(*k, *v);
    }
    config.set("bootstrap.servers", &settings.brokers);
    for (k, v) in &settings.options {
        config.set(k, v);
    }
    config
}

impl<U: Undelivered> KafkaSink<U> {
    /// Creates the producer and checks, within `metadata_timeout`, that the topic exists.
    /// A bad option or a missing topic is an error. An unreachable broker is not: the agent must
    /// capture while Kafka is down, so it is logged once and the records wait in librdkafka.
    pub fn with_undelivered(
        settings: KafkaSettings,
        undelivered: U,
    ) -> Result<Self, KafkaSinkError> {
        let shared = Arc::new(Shared {
            in_flight: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            failed: Mutex::new(Vec::new()),
            last_failure: Mutex::new(None),
            broker_errors: Mutex::new(Throttle::default()),
            sent_total: counter!(m::KAFKA_RECORDS_SENT),
            bytes_total: counter!(m::KAFKA_BYTES),
            queue_depth: gauge!(m::KAFKA_QUEUE_DEPTH),
        });
        let context = Context {
            shared: Arc::clone(&shared),
            brokers: settings.brokers.clone(),
        };
        let producer: ThreadedProducer<Context> = client_config(&settings)
            .create_with_context(context)
            .map_err(|e| match e {
                KafkaError::ClientConfig(_, reason, key, value) => {
                    KafkaSinkError::Option { key, value, reason }
                }
                source => KafkaSinkError::Create {
                    brokers: settings.brokers.clone(),
                    source,
                },
            })?;
        let sink = Self {
            producer,
            shared,
            settings,
            undelivered,
            key: Vec::with_capacity(64),
            value: Vec::with_capacity(256),
            stalled_at: None,
            undelivered_log: Throttle::default(),
            undelivered_total: 0,
            queue_full_log: Throttle::default(),
        };
        sink.check_topic()?;
        Ok(sink)
    }

    /// Reads the topic's metadata (`allow.auto.create.topics=false`, so asking does not create
    /// it on brokers that allow that) and checks it exists. "Unknown topic" is asked again until
    /// `metadata_timeout`: a broker may say so briefly while it creates or deletes other topics.
    fn check_topic(&self) -> Result<(), KafkaSinkError> {
        let s = &self.settings;
        let deadline = Instant::now() + s.metadata_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let metadata = match self
                .producer
                .client()
                .fetch_metadata(Some(&s.topic), left.max(Duration::from_millis(500)))
            {
                Ok(metadata) => metadata,
                Err(e) => {
                    self.unreachable_at_start(&e);
                    return Ok(());
                }
            };
            let error = match metadata.topics().iter().find(|t| t.name() == s.topic) {
                None => Some(RDKafkaErrorCode::UnknownTopicOrPartition),
                Some(topic) => topic.error().map(RDKafkaErrorCode::from),
            };
            match error {
                None => {
                    let partitions = metadata.topics()[0].partitions().len();
                    info!(
                        brokers = %s.brokers,
                        topic = %s.topic,
                        partitions,
                        "producing flow records to Kafka"
                    );
                    return Ok(());
                }
                Some(code) if Instant::now() < deadline => {
                    debug!(topic = %s.topic, ?code, "topic not usable yet; asking again");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                    return Err(KafkaSinkError::MissingTopic {
                        topic: s.topic.clone(),
                        brokers: s.brokers.clone(),
                    });
                }
                Some(code) => {
                    return Err(KafkaSinkError::Topic {
                        topic: s.topic.clone(),
                        brokers: s.brokers.clone(),
                        error: code.to_string(),
                    });
                }
            }
        }
    }

    /// The start-up metadata request failed: logged once (unless the client's error callback
    /// has just said so) and counted; capture goes on.
    fn unreachable_at_start(&self, e: &KafkaError) {
        let s = &self.settings;
        counter!(m::KAFKA_BROKER_ERRORS, "kind" => "unreachable_at_start").increment(1);
        let mut throttle = self
            .shared
            .broker_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if throttle.hit() {
            warn!(
                brokers = %s.brokers,
                topic = %s.topic,
                "Kafka brokers unreachable at start ({e}; waited {:?}): capturing anyway; records \
                 wait in the producer queue and are retried until message.timeout.ms",
                s.metadata_timeout
            );
        }
    }

    /// The keeper of undelivered records (for tests and, later, the spool's owner).
    pub fn undelivered(&self) -> &U {
        &self.undelivered
    }

    /// Messages handed to librdkafka whose delivery report has not arrived yet.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Hands records that librdkafka gave up on to the keeper; counts and logs them.
    fn collect_failures(&mut self) {
        let failed =
            std::mem::take(&mut *self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()));
        if failed.is_empty() {
            return;
        }
        let n = failed.len() as u64;
        self.undelivered_total += n;
        counter!(m::KAFKA_UNDELIVERED).increment(n);
        if self.undelivered_log.due() {
            let reason = self
                .shared
                .last_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            error!(
                brokers = %self.settings.brokers,
                topic = %self.settings.topic,
                records = n,
                total = self.undelivered_total,
                "Kafka did not take records ({reason}); kept aside as undelivered"
            );
        }
        self.undelivered.keep(failed);
    }

    /// Waits until every delivery report has arrived or `bound` has passed; true if all arrived.
    async fn wait_deliveries(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            if self.in_flight() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl<U: Undelivered> RecordSink for KafkaSink<U> {
    async fn write(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        self.collect_failures();
        for record in records {
            self.key.clear();
            self.key.extend_from_slice(&avro::key(record));
            self.value.clear();
            avro::encode(record, self.settings.schema_id, &mut self.value);
            let timestamp = i64::try_from(record.end_ns / 1_000_000).unwrap_or(i64::MAX);
            loop {
                // Counted before the send: its report may arrive before `send` returns.
                self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                let message = BaseRecord::to(&self.settings.topic)
                    .key(&self.key[..])
                    .payload(&self.value[..])
                    .timestamp(timestamp);
                let Err((e, _)) = self.producer.send(message) else {
                    break;
                };
                self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
                    // Backpressure: wait for deliveries to make room, never drop.
                    counter!(m::KAFKA_QUEUE_FULL_WAITS).increment(1);
                    if self.queue_full_log.hit() {
                        warn!(
                            brokers = %self.settings.brokers,
                            count = self.queue_full_log.count,
                            "Kafka producer queue full: waiting for deliveries (capture slows down)"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                // Not retriable at this point (e.g. message too large): keep it aside.
                counter!(m::KAFKA_DELIVERY_ERRORS, "kind" => error_kind(&e)).increment(1);
                *self
                    .shared
                    .last_failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                self.shared
                    .failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(record.clone());
                break;
            }
        }
        self.shared.queue_depth.set(self.in_flight() as f64);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        let sent = self.shared.sent.load(Ordering::Relaxed);
        let wait = match self.stalled_at {
            // No progress since the last flush gave up: do not stall capture again.
            Some(at) if at == sent => Duration::ZERO,
            _ => self.settings.flush_wait,
        };
        if self.wait_deliveries(wait).await {
            self.stalled_at = None;
        } else {
            self.stalled_at = Some(self.shared.sent.load(Ordering::Relaxed));
        }
        self.collect_failures();
        Ok(())
    }
}

impl<U: Undelivered> Drop for KafkaSink<U> {
    /// Shutdown: waits up to `shutdown_wait` for outstanding deliveries, then purges what is
    /// left (their reports come back as failures) and accounts for every undelivered record.
    fn drop(&mut self) {
        let left = self.in_flight();
        if left > 0 {
            info!(
                records = left,
                "waiting up to {:?} for Kafka deliveries", self.settings.shutdown_wait
            );
            let _ = self.producer.flush(self.settings.shutdown_wait);
            if self.in_flight() > 0 {
                self.producer
                    .purge(PurgeConfig::default().queue().inflight());
                let _ = self.producer.flush(Duration::from_secs(1));
            }
        }
        self.collect_failures();
        if self.undelivered_total > 0 {
            error!(
                brokers = %self.settings.brokers,
                topic = %self.settings.topic,
                records = self.undelivered_total,
                "flow records not delivered to Kafka during this run (no spool yet: lost at exit)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_snake_case() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(error_kind(&e), "message_timed_out");
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        assert_eq!(error_kind(&e), "queue_full");
    }

    #[test]
    fn user_options_override_defaults() {
        let mut settings = KafkaSettings::new("b:9092", "t");
        settings.options = vec![("linger.ms".into(), "5".into())];
        let config = client_config(&settings);
        assert_eq!(config.get("linger.ms"), Some("5"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn unknown_option_is_named() {
        let mut settings = KafkaSettings::new("127.0.0.1:1", "t");
        settings.options = vec![("no.such.option".into(), "1".into())];
        match KafkaSink::connect(settings) {
            Err(KafkaSinkError::Option { key, .. }) => assert_eq!(key, "no.such.option"),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("an unknown option was accepted"),
        }
    }

    #[test]
    fn throttle_logs_first_then_once_a_minute() {
        let mut t = Throttle::default();
        assert!(t.hit());
        assert!(!t.hit());
        assert_eq!(t.count, 2);
    }
}
