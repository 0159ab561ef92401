//! The Kafka output (`--output kafka`): each flow record becomes one message — key
//! [`flowlog_record::avro::key`] (flow id and host, so a flow's records stay in one partition, in
//! order), value the Confluent-framed Avro of [`flowlog_record::avro::encode`] — produced with
//! librdkafka (rdkafka's `ThreadedProducer`: `acks=all`, idempotent, zstd, batched).
//!
//! The disk spool ([`crate::spool`]) is the sink's write-ahead log, after Vector's disk buffer:
//! - [`KafkaSink::write`] encodes each record and **appends it to the spool**; [`KafkaSink::flush`]
//!   writes the spool file (a record then survives a crash of the agent) and fsyncs it at most
//!   once a second (then it survives a power loss).
//! - A **pump**, run by `write`, `flush` and [`RecordSink::idle`] on the agent's task (no other
//!   thread touches the spool), produces records from [`Spool::next_unsent`] into librdkafka in
//!   spool order while at most [`MAX_IN_FLIGHT`] are outstanding, each message carrying its
//!   [`SpoolId`] as the delivery opaque.
//! - **Sent means acknowledged**: the delivery callback queues `(id, result)`; a success
//!   [`Spool::ack`]s the record (it leaves the spool), a failure (librdkafka gave up: message
//!   timeout, purge, a non-retriable error) is counted by kind, and once every outstanding report
//!   is in, the spool is rewound ([`Spool::rewind_unacked`]) and the unacknowledged records are
//!   produced again. **At-least-once**: a record delivered whose report was lost (crash, timeout
//!   after a write) is delivered twice; consumers deduplicate on `(host, flow_id, seq)`.
//! - **Spool full**: the newest record is dropped, counted
//!   (`flowlog_sidecar_spool_dropped_total`) and logged once (then at most once a minute).
//! - A broker outage never stalls capture: records pile up in the spool and are replayed in order
//!   when the broker is back; an agent crash or restart replays what the spool holds first.
//! - [`RecordSink::close`] (agent shutdown) waits up to [`KafkaSettings::shutdown_wait`] for
//!   deliveries, then purges what is in flight and fsyncs the spool: what was not acknowledged
//!   stays on disk for the next start. Dropping the sink waits for nothing (a `Drop` cannot be
//!   awaited and must not block a runtime thread for seconds): a sink dropped without `close`
//!   keeps its unacknowledged records in the spool too, unsynced.
use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use flowlog_diag::LogThrottle;
use flowlog_kafka::{ClientErrors, ClientSettings, OptionError, TopicError, error_kind};
use flowlog_record::avro;
use metrics::{Counter, Gauge, counter, gauge};
use rdkafka::{
    ClientConfig, ClientContext,
    config::RDKafkaLogLevel,
    error::{KafkaError, RDKafkaErrorCode},
    message::{DeliveryResult, Message},
    producer::{BaseRecord, Partitioner, Producer, ProducerContext, PurgeConfig, ThreadedProducer},
    statistics::Statistics,
};
use tracing::{error, info, warn};

use crate::{
    metrics as m,
    record::FlowRecord,
    sink::{RecordSink, SinkError},
    spool::{Spool, SpoolError, SpoolId, SpoolRecord},
};

/// Messages produced whose delivery report has not arrived, at most: bounds the memory the
/// producer holds; the rest waits in the spool.
pub const MAX_IN_FLIGHT: u64 = 100_000;
/// Records read from the spool per call.
const PUMP_BATCH: usize = 4096;
/// Spool fsync period.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How often [`RecordSink::close`] looks for delivery reports while it waits.
const CLOSE_POLL: Duration = Duration::from_millis(5);

/// Where and how to produce.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers` and the options of `--kafka-config`, shared with the start-up check.
    pub client: ClientSettings,
    pub topic: String,
    /// Schema-registry id of `schemas/flow_record.v1.avsc`, written in every message's header.
    pub schema_id: u32,
    /// librdkafka options (`--kafka-option`) applied after (and so overriding) the defaults of
    /// [`PRODUCER_DEFAULTS`] and the options of `client`.
    pub options: Vec<(String, String)>,
    /// How long the start-up check waits for the cluster's metadata.
    pub metadata_timeout: Duration,
    /// How long [`RecordSink::close`] (shutdown) waits for outstanding deliveries.
    pub shutdown_wait: Duration,
    /// The spool directory (write-ahead log of records not yet acknowledged).
    pub spool_dir: PathBuf,
    /// Largest size of the spool's segment files.
    pub spool_max_bytes: u64,
    /// Receives librdkafka's statistics when `statistics.interval.ms` is set in `options`.
    pub stats: Option<StatsHook>,
    /// How records are spread over the topic's partitions.
    pub partitioning: Partitioning,
}

/// How the agent's records are spread over the topic's partitions. Either way every record of
/// a flow goes to one partition, so a flow's records stay in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partitioning {
    /// All of this host's records to one partition ([`avro::host_partition`]: Kafka's default
    /// partitioner applied to the host name). A producer batch then holds everything the host
    /// produced in `linger.ms`, not a partition-count-th of it, which is what makes records
    /// cheap on the wire at low rates. A partition carries the records of the hosts that hash
    /// to it: with many hosts the load evens out; a fleet of fewer hosts than partitions leaves
    /// partitions (and enricher replicas) idle.
    #[default]
    Host,
    /// Records spread by key (flow id and host) with librdkafka's configured partitioner:
    /// a host's records over every partition.
    Flow,
}

impl std::str::FromStr for Partitioning {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Self::Host),
            "flow" => Ok(Self::Flow),
            _ => Err(format!("`{s}` is not a partitioning: use `host` or `flow`")),
        }
    }
}

/// librdkafka's "unassigned partition": it retries partitioning later.
const PARTITION_UNASSIGNED: i32 = -1;

/// [`Partitioning::Host`] as a librdkafka partitioner (called on librdkafka's threads).
pub struct HostPartitioner;

impl Partitioner for HostPartitioner {
    fn partition(
        &self,
        _topic: &str,
        key: Option<&[u8]>,
        partition_cnt: i32,
        _is_partition_available: impl Fn(i32) -> bool,
    ) -> i32 {
        key.and_then(|key| avro::host_partition(key, partition_cnt))
            .unwrap_or(PARTITION_UNASSIGNED)
    }
}

/// A receiver of librdkafka's statistics (every `statistics.interval.ms`; off by default): the
/// client's own counts of what it sent — bytes on the wire per broker, compressed batch sizes
/// and message counts per topic — which the wire benchmark (`benches/src/bin/kafka`) divides by
/// the records produced. Called on librdkafka's thread.
#[derive(Clone)]
pub struct StatsHook(pub Arc<dyn Fn(&Statistics) + Send + Sync>);

impl std::fmt::Debug for StatsHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsHook")
    }
}

impl KafkaSettings {
    /// Settings with the defaults for everything but where to produce (`client`: the
    /// brokers, or [`ClientSettings`] with the `--kafka-config` options).
    pub fn new(client: impl Into<ClientSettings>, topic: impl Into<String>) -> Self {
        Self {
            client: client.into(),
            topic: topic.into(),
            schema_id: flowlog_record::avro::DEFAULT_SCHEMA_ID,
            options: Vec::new(),
            metadata_timeout: Duration::from_secs(5),
            shutdown_wait: Duration::from_secs(10),
            spool_dir: PathBuf::from(DEFAULT_SPOOL_DIR),
            spool_max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            stats: None,
            partitioning: Partitioning::default(),
        }
    }
}

pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/flowlog/spool";
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;

/// Producer settings flowlog uses unless a `--kafka-option` says otherwise: every record
/// acknowledged by all in-sync replicas, no duplicates from retries, zstd, and batches of up to
/// 1 MiB collected for 500 ms (flow records are small; batching is what makes them cheap).
///
/// `linger.ms` trades delay for bytes where the rate is low: a batch holds what the host
/// produced in that time (its records go to one partition), up to `batch.size`. At 200 records/s
/// 200 ms gave 57 records a batch and 24.8 bytes a record on the wire, 500 ms 117 records and
/// 22.7 bytes, 1 s 215 records and 21.8 bytes; at 2,000 records/s 200 ms already gave 20.1
/// (`benches/kafka`, benches/RESULTS.md; the target is 24). A busy host fills its batches
/// sooner, so only a quiet one waits the whole linger, well inside the 2 s budget from a
/// connection's end to its enriched record.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "flowlog-sidecar"),
    // The topic must exist; a typo must not create a new one on brokers that allow it.
    ("allow.auto.create.topics", "false"),
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("compression.type", "zstd"),
    ("linger.ms", "500"),
    ("batch.size", "1048576"),
    ("batch.num.messages", "100000"),
    ("queue.buffering.max.messages", "500000"),
    ("queue.buffering.max.kbytes", "262144"),
];

/// Why the Kafka output could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// librdkafka rejected an option (unknown name or bad value).
    #[error(transparent)]
    Option(OptionError),
    #[error("opening the spool")]
    Spool(#[source] SpoolError),
    #[error("creating the Kafka producer for {brokers}")]
    Create { brokers: String, source: KafkaError },
    /// The topic does not exist or is not usable (topics are not created by the agent).
    #[error(transparent)]
    Topic(#[from] TopicError),
}

/// A delivery report, as the callback queues it for the agent's task.
type Report = (SpoolId, Result<(), KafkaError>);

/// State shared with librdkafka's delivery-report thread.
struct Shared {
    /// Messages handed to librdkafka whose delivery report has not arrived.
    in_flight: AtomicU64,
    /// Delivery reports not yet applied to the spool.
    reports: Mutex<Vec<Report>>,
    broker_errors: ClientErrors,
    sent_total: Counter,
    bytes_total: Counter,
    queue_depth: Gauge,
}

/// The librdkafka client context: routes delivery reports and client errors into [`Shared`].
struct Context {
    shared: Arc<Shared>,
    stats: Option<StatsHook>,
    /// `Some` for [`Partitioning::Host`]; otherwise librdkafka's own partitioner.
    partitioner: Option<HostPartitioner>,
}

impl ClientContext for Context {
    /// Statistics go to the hook if there is one; otherwise they are dropped (rdkafka's default
    /// would log each one).
    fn stats(&self, statistics: Statistics) {
        if let Some(hook) = &self.stats {
            (hook.0)(&statistics);
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.shared.broker_errors.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.broker_errors.report(&error, reason);
    }
}

impl ProducerContext<HostPartitioner> for Context {
    type DeliveryOpaque = Box<SpoolId>;

    fn get_custom_partitioner(&self) -> Option<&HostPartitioner> {
        self.partitioner.as_ref()
    }

    fn delivery(&self, result: &DeliveryResult<'_>, id: Box<SpoolId>) {
        let s = &self.shared;
        let outcome = match result {
            Ok(message) => {
                s.sent_total.increment(1);
                let bytes =
                    message.key().map_or(0, <[u8]>::len) + message.payload().map_or(0, <[u8]>::len);
                s.bytes_total.increment(bytes as u64);
                Ok(())
            }
            Err((e, _)) => {
                counter!(m::KAFKA_DELIVERY_ERRORS, "kind" => error_kind(e)).increment(1);
                Err(e.clone())
            }
        };
        s.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((*id, outcome));
        let left = s
            .in_flight
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        s.queue_depth.set(left as f64);
    }
}

/// Flow records to a Kafka topic through the disk spool. See the module docs for its guarantees.
pub struct KafkaSink {
    producer: ThreadedProducer<Context, HostPartitioner>,
    shared: Arc<Shared>,
    settings: KafkaSettings,
    spool: Spool,
    /// Records read from the spool that librdkafka's full queue did not take yet, in order.
    pending: VecDeque<SpoolRecord>,
    /// A delivery failed: rewind the spool once every outstanding report is in.
    rewind_pending: bool,
    last_sync: Instant,
    /// Reused buffers for the record being spooled.
    key: Vec<u8>,
    value: Vec<u8>,
    dropped_total: u64,
    dropped_log: LogThrottle,
    failed_log: LogThrottle,
    spool_error_log: LogThrottle,
    spool_records: Gauge,
    spool_bytes: Gauge,
    spool_dropped: Counter,
    /// [`RecordSink::close`] ran: dropping the sink then has nothing left to report.
    closed: bool,
}

/// The librdkafka configuration: defaults, brokers, the `--kafka-config` options, then the
/// `--kafka-option`s.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    settings
        .client
        .client_config(PRODUCER_DEFAULTS, &settings.options)
}

impl KafkaSink {
    /// Creates the producer, opens the spool (replaying what a previous run left) and checks,
    /// within `metadata_timeout`, that the topic exists. A bad option, a missing topic or a spool
    /// that cannot be opened is an error. An unreachable broker is not: the agent must capture
    /// while Kafka is down, so it is logged once and the records wait in the spool.
    pub fn connect(settings: KafkaSettings) -> Result<Self, KafkaSinkError> {
        let shared = Arc::new(Shared {
            in_flight: AtomicU64::new(0),
            reports: Mutex::new(Vec::new()),
            broker_errors: ClientErrors::new(
                m::KAFKA_BROKER_ERRORS,
                &settings.client.brokers,
                "capturing anyway, records wait in the spool and are retried",
            ),
            sent_total: counter!(m::KAFKA_RECORDS_SENT),
            bytes_total: counter!(m::KAFKA_BYTES),
            queue_depth: gauge!(m::KAFKA_QUEUE_DEPTH),
        });
        let context = Context {
            shared: Arc::clone(&shared),
            stats: settings.stats.clone(),
            partitioner: (settings.partitioning == Partitioning::Host).then_some(HostPartitioner),
        };
        let config = client_config(&settings);
        let producer: ThreadedProducer<Context, HostPartitioner> = config
            .create_with_context(context)
            .map_err(|e| match OptionError::from_kafka(&e) {
                Some(option) => KafkaSinkError::Option(option),
                None => KafkaSinkError::Create {
                    brokers: settings.client.brokers.clone(),
                    source: e,
                },
            })?;
        let (spool, report) = Spool::open(&settings.spool_dir, settings.spool_max_bytes)
            .map_err(KafkaSinkError::Spool)?;
        for corruption in &report.corrupt {
            error!(
                spool = %settings.spool_dir.display(),
                "spool: {corruption}; the records before it are replayed, the rest of that file is skipped"
            );
        }
        if let Some(torn) = &report.torn_tail {
            warn!(
                file = %torn.path.display(),
                offset = torn.offset,
                discarded_bytes = torn.discarded_bytes,
                "spool: a crash left an incomplete last record; truncated (the records before it are kept)"
            );
        }
        if report.records > 0 {
            info!(
                spool = %settings.spool_dir.display(),
                records = report.records,
                bytes = report.record_bytes,
                segments = report.segments,
                "spool holds records not yet delivered: replaying them first"
            );
        }
        let sink = Self {
            producer,
            shared,
            settings,
            spool,
            pending: VecDeque::new(),
            rewind_pending: false,
            last_sync: Instant::now(),
            key: Vec::with_capacity(64),
            value: Vec::with_capacity(256),
            dropped_total: 0,
            dropped_log: LogThrottle::default(),
            failed_log: LogThrottle::default(),
            spool_error_log: LogThrottle::default(),
            spool_records: gauge!(m::SPOOL_RECORDS),
            spool_bytes: gauge!(m::SPOOL_BYTES),
            spool_dropped: counter!(m::SPOOL_DROPPED),
            closed: false,
        };
        sink.check_topic(&config)?;
        sink.export();
        Ok(sink)
    }

    /// Checks that the topic exists ([`flowlog_kafka::check_topic`]). Brokers that do not
    /// answer are not an error: the agent captures while Kafka is down. A broker that refuses
    /// the client's TLS or SASL is: that is a configuration to fix, not an outage to wait out.
    fn check_topic(&self, config: &ClientConfig) -> Result<(), KafkaSinkError> {
        let s = &self.settings;
        let client = self.producer.client();
        let errors = &self.shared.broker_errors;
        // The producer's own thread serves its events (and so the error callback).
        let checked =
            flowlog_kafka::check_topic(client, config, &s.topic, s.metadata_timeout, errors, || {});
        match checked {
            Ok(partitions) => {
                info!(
                    brokers = %s.client.brokers,
                    topic = %s.topic,
                    partitions,
                    "producing flow records to Kafka"
                );
                Ok(())
            }
            Err(TopicError::Unreachable { source, .. }) => {
                self.unreachable_at_start(&source);
                Ok(())
            }
            Err(e) => Err(KafkaSinkError::Topic(e)),
        }
    }

    /// The start-up metadata request failed: counted and logged with the client's own errors
    /// (once, then once a minute); capture goes on.
    fn unreachable_at_start(&self, e: &KafkaError) {
        let s = &self.settings;
        self.shared.broker_errors.note(
            "unreachable_at_start",
            &format!(
                "no answer at start for topic {} ({e}; waited {:?})",
                s.topic, s.metadata_timeout
            ),
        );
    }

    /// Messages handed to librdkafka whose delivery report has not arrived yet.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// The spool (records not yet acknowledged).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    fn export(&self) {
        self.spool_records.set(self.spool.len_records() as f64);
        self.spool_bytes.set(self.spool.len_bytes() as f64);
        self.shared.queue_depth.set(self.in_flight() as f64);
    }

    fn spool_failed(&mut self, op: &str, e: &SpoolError) {
        counter!(m::SPOOL_ERRORS, "op" => op.to_string()).increment(1);
        if self.spool_error_log.hit() {
            error!(
                spool = %self.settings.spool_dir.display(),
                count = self.spool_error_log.count,
                "spool {op} failed: {}",
                flowlog_diag::error_chain(e)
            );
        }
    }

    /// The sink's error for a spool failure, keeping the failure as its cause.
    fn spool_error(&self, source: SpoolError) -> SinkError {
        SinkError::Spool {
            dir: self.settings.spool_dir.clone(),
            source,
        }
    }

    /// Applies the delivery reports that arrived: acknowledged records leave the spool; a failure
    /// schedules a rewind.
    fn collect_reports(&mut self) {
        let reports = std::mem::take(
            &mut *self
                .shared
                .reports
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let mut failed = 0u64;
        let mut reason = None;
        for (id, result) in reports {
            match result {
                Ok(()) => {
                    if let Err(e) = self.spool.ack(id) {
                        self.spool_failed("ack", &e);
                    }
                }
                Err(e) => {
                    failed += 1;
                    reason = Some(e);
                }
            }
        }
        if failed > 0 {
            counter!(m::KAFKA_UNDELIVERED).increment(failed);
            self.rewind_pending = true;
            if self.failed_log.hit() {
                warn!(
                    brokers = %self.settings.client.brokers,
                    topic = %self.settings.topic,
                    records = failed,
                    "Kafka did not take records ({}); they stay in the spool and are produced \
                     again",
                    reason.map(|e| e.to_string()).unwrap_or_default()
                );
            }
        }
    }

    /// Produces one spooled record; false if librdkafka's queue is full (try again later).
    fn produce(&mut self, record: &SpoolRecord) -> bool {
        // Counted before the send: its report may arrive before `send` returns.
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let message = BaseRecord::with_opaque_to(&self.settings.topic, Box::new(record.id))
            .key(&record.key[..])
            .payload(&record.payload[..]);
        let Err((e, _)) = self.producer.send(message) else {
            return true;
        };
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
            counter!(m::KAFKA_QUEUE_FULL_WAITS).increment(1);
            return false;
        }
        // Refused before it was queued and never acceptable (e.g. larger than the broker's
        // limit): retrying cannot help, so it is counted, logged and removed from the spool.
        counter!(m::KAFKA_DELIVERY_ERRORS, "kind" => error_kind(&e)).increment(1);
        error!(
            topic = %self.settings.topic,
            id = %record.id,
            "Kafka refused a record ({e}); dropped from the spool"
        );
        if let Err(e) = self.spool.ack(record.id) {
            self.spool_failed("ack", &e);
        }
        true
    }

    /// Writes the spool's buffered records to its file, and fsyncs it if the last fsync is
    /// [`SYNC_EVERY`] old. A failure is counted and logged here.
    fn persist(&mut self) -> Result<(), SpoolError> {
        let result = if self.last_sync.elapsed() >= SYNC_EVERY {
            self.last_sync = Instant::now();
            self.spool.sync()
        } else {
            self.spool.flush()
        };
        if let Err(e) = &result {
            self.spool_failed("flush", e);
        }
        result
    }

    /// Applies delivery reports, then produces spooled records in order while fewer than
    /// [`MAX_IN_FLIGHT`] are outstanding and librdkafka takes them.
    fn pump(&mut self) {
        self.collect_reports();
        if self.rewind_pending {
            if self.in_flight() > 0 {
                // Rewind only once every outstanding report is in: no record is in flight
                // twice, and the replay keeps spool order.
                self.export();
                return;
            }
            self.collect_reports();
            self.pending.clear();
            self.spool.rewind_unacked();
            self.rewind_pending = false;
        }
        'pump: while self.in_flight() < MAX_IN_FLIGHT {
            if self.pending.is_empty() {
                let room = (MAX_IN_FLIGHT - self.in_flight()) as usize;
                match self.spool.next_unsent(room.min(PUMP_BATCH)) {
                    Ok(batch) if batch.is_empty() => break,
                    Ok(batch) => self.pending.extend(batch),
                    Err(e) => {
                        // Corruption: reported once, the spool skips past it.
                        self.spool_failed("read", &e);
                        continue;
                    }
                }
            }
            while let Some(record) = self.pending.pop_front() {
                if !self.produce(&record) {
                    self.pending.push_front(record);
                    break 'pump;
                }
                if self.in_flight() >= MAX_IN_FLIGHT {
                    break 'pump;
                }
            }
        }
        self.export();
    }
}

impl RecordSink for KafkaSink {
    async fn write(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        for record in records {
            self.key.clear();
            avro::key_into(record, &mut self.key);
            self.value.clear();
            avro::encode(record, self.settings.schema_id, &mut self.value);
            match self.spool.append(&self.key, &self.value) {
                Ok(()) => {}
                Err(e @ SpoolError::Full { .. }) => {
                    self.dropped_total += 1;
                    self.spool_dropped.increment(1);
                    if self.dropped_log.hit() {
                        error!(
                            dropped = self.dropped_total,
                            "{e} (flowlog_sidecar_spool_dropped_total counts them)"
                        );
                    }
                }
                Err(e) => {
                    self.spool_failed("append", &e);
                    return Err(self.spool_error(e));
                }
            }
        }
        self.pump();
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        if let Err(e) = self.persist() {
            return Err(self.spool_error(e));
        }
        self.pump();
        Ok(())
    }

    async fn idle(&mut self) -> Result<(), SinkError> {
        self.pump();
        // Nothing new to write; this keeps the once-a-second fsync going while the host is quiet.
        let _ = self.persist();
        Ok(())
    }

    /// Shutdown: for up to `shutdown_wait`, keeps producing and collecting reports until the
    /// spool is empty; then purges what is in flight (not acknowledged, so it stays spooled) and
    /// fsyncs the spool for the next start. Records left over are logged (with the
    /// `flowlog_sidecar_spool_records` gauge saying how many), not an error: the spool exists
    /// so that an agent can stop while Kafka is away.
    async fn close(&mut self) -> Result<(), SinkError> {
        let deadline = Instant::now() + self.settings.shutdown_wait;
        let mut said = false;
        loop {
            self.pump();
            if self.spool.len_records() == 0 && self.in_flight() == 0 {
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            if !said {
                said = true;
                info!(
                    records = self.spool.len_records(),
                    "waiting up to {:?} for Kafka deliveries", self.settings.shutdown_wait
                );
            }
            tokio::time::sleep(CLOSE_POLL).await;
        }
        if self.in_flight() > 0 {
            self.producer
                .purge(PurgeConfig::default().queue().inflight());
            // Purged messages get their (failed) reports at once; this only waits for those.
            let _ = self.producer.flush(Duration::from_secs(1));
        }
        self.collect_reports();
        self.closed = true;
        let synced = self.spool.sync();
        if let Err(e) = &synced {
            self.spool_failed("sync", e);
        }
        self.export();
        let left = self.spool.len_records();
        if left > 0 {
            error!(
                brokers = %self.settings.client.brokers,
                topic = %self.settings.topic,
                records = left,
                spool = %self.settings.spool_dir.display(),
                "flow records not delivered to Kafka yet: kept in the spool, delivered at the next start"
            );
        }
        synced.map_err(|e| self.spool_error(e))
    }
}

impl Drop for KafkaSink {
    /// Waits for nothing: shutdown is [`RecordSink::close`]. Without it (an error ended the
    /// agent early) the spool's own drop writes out its buffer and acknowledgements, and the
    /// unacknowledged records are delivered at the next start; this only says so.
    fn drop(&mut self) {
        let left = self.spool.len_records();
        if !self.closed && left > 0 {
            warn!(
                records = left,
                spool = %self.settings.spool_dir.display(),
                "Kafka sink dropped without close: undelivered flow records stay in the spool \
                 for the next start"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Err(KafkaSinkError::Option(e)) => assert_eq!(e.key, "no.such.option"),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("an unknown option was accepted"),
        }
    }
}
