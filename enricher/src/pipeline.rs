//! The Kafka-to-Kafka pipeline of one enricher replica: read `flows.raw` in the consumer group,
//! decode, attribute ([`crate::attribute`]), write `flows.enriched` and Parquet, and store each
//! input offset once its record is durable in every output ([`crate::offsets`]).
//!
//! One task runs it all (decoding and attribution are microseconds a record; librdkafka's own
//! threads do the network), so there is no locking on the hot path but the index's read lock.
//!
//! - A message that cannot be decoded (empty, truncated, wrong magic byte, unknown schema id,
//!   malformed datum) is copied to the dead-letter topic with the error in the `flowlog.error`
//!   header and its origin in `flowlog.source` (`topic/partition/offset`), counted by reason,
//!   and its offset is committed once the dead letter is acknowledged.
//! - A delivery that fails is produced again; a full producer queue is waited out
//!   (backpressure reaches the consumer, which stops reading), never dropped.
//! - Shutdown: the Parquet files are closed and uploaded, the producer flushed, the offsets of
//!   everything durable stored and committed. Flows still held are not: the next owner of their
//!   partition reads them again (at-least-once; deduplicate on `(host, flow_id, seq)`).
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use flowlog_cli::Health;
use flowlog_cli::histogram::{FixedHistogram, Tally};
use flowlog_diag::LogThrottle;
use flowlog_identity::SharedIndex;
use flowlog_record::{EnrichedFlow, avro, enriched_avro};
use futures::FutureExt as _;
use metrics::{Counter, counter, gauge};
use rdkafka::{
    consumer::StreamConsumer,
    consumer::{CommitMode, Consumer as _},
    error::{KafkaError, KafkaResult, RDKafkaErrorCode},
    message::{BorrowedMessage, Header, Message, OwnedHeaders, OwnedMessage},
    producer::{BaseRecord, Producer as _, ThreadedProducer},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    attribute::{Attributor, now_ns, patience},
    kafka::{ClientError, Clients, Context, KafkaSettings, Report, Shared, Token},
    metrics as m,
    offsets::OffsetTracker,
    storage::{ParquetSink, StorageError},
};

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub kafka: KafkaSettings,
    /// Longest a flow waits for a continuous source, and the allowance beyond a polled source's
    /// period ([`crate::attribute`]).
    pub hold: Duration,
    /// How far the flows' clocks may be from the inventories' ([`crate::attribute`]).
    pub clock_skew: Duration,
    /// Most input messages not yet committable; past it the consumer stops reading until
    /// outputs catch up (bounds memory during a broker outage or a slow store), and the open
    /// Parquet files are closed early so that their records become committable.
    pub max_pending: usize,
    /// How long shutdown waits for the producer's outstanding deliveries.
    pub shutdown_wait: Duration,
    /// What `/healthz` and `/readyz` answer, if the process serves them: the loop beats it; it
    /// is ready while partitions are assigned ([`PARTITIONS_ASSIGNED`]) and the inventory is
    /// complete to within the hold ([`INVENTORY_CAUGHT_UP`]).
    pub health: Option<Health>,
}

/// Readiness check: this replica was assigned at least one partition of the input topic. A
/// replica without partitions (more replicas than partitions) does no work and says so.
pub const PARTITIONS_ASSIGNED: &str = "partitions_assigned";
/// Readiness check: every inventory source has reported up to at least `now` minus its patience
/// (`hold`, or a polled source's period + `hold`), so flows arriving now are attributed rather
/// than held until they go out `unknown`.
pub const INVENTORY_CAUGHT_UP: &str = "inventory_caught_up";
/// Readiness check that fails once shutdown began.
pub const NOT_STOPPING: &str = "not_stopping";
/// How long the loop may go without a turn before `/healthz` fails. Its tick turns it every
/// 100 ms, also while it waits on a full producer queue; a Parquet upload retrying against an
/// unreachable store holds it, so the limit is generous.
pub const STALL_LIMIT: Duration = Duration::from_secs(120);
/// Declares the pipeline's readiness checks, all failing until the pipeline runs and finds
/// them true: call it before the health is served, so that no probe sees a process that has
/// declared nothing yet as ready.
pub fn declare_readiness(health: &Health) {
    health.expect(NOT_STOPPING, "starting: the pipeline is not running yet");
    health.expect(
        PARTITIONS_ASSIGNED,
        "waiting for the consumer group's assignment",
    );
    health.expect(
        INVENTORY_CAUGHT_UP,
        "waiting for the inventory's first watermark",
    );
}

/// Most input messages taken in one turn of the loop when librdkafka already holds them.
const BATCH: usize = 1024;

/// How often readiness is re-evaluated (the assignment is a call into librdkafka).
const HEALTH_PERIOD: Duration = Duration::from_secs(1);

impl PipelineSettings {
    pub fn new(kafka: KafkaSettings) -> Self {
        Self {
            kafka,
            hold: Duration::from_secs(5),
            clock_skew: Duration::ZERO,
            max_pending: 500_000,
            shutdown_wait: Duration::from_secs(30),
            health: None,
        }
    }
}

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Kafka(#[from] ClientError),
    #[error("writing Parquet")]
    Storage(#[from] StorageError),
}

/// Why an input message is a dead letter: its metric label and its message.
fn dead_letter_reason(e: &avro::DecodeError) -> &'static str {
    match e {
        avro::DecodeError::Truncated(_) => "truncated",
        avro::DecodeError::WrongMagicByte(_) => "wrong_magic_byte",
        avro::DecodeError::UnknownSchemaId(_) => "unknown_schema_id",
        avro::DecodeError::Malformed(_) => "malformed",
    }
}

/// The pipeline's state between turns of its loop.
struct Pipeline {
    settings: PipelineSettings,
    producer: ThreadedProducer<Context>,
    shared: Arc<Shared>,
    parquet: Option<ParquetSink>,
    attributor: Attributor<Token>,
    offsets: OffsetTracker,
    /// Attributed flows not yet written to the outputs.
    ready: Vec<(EnrichedFlow, Token)>,
    reports: Vec<Report>,
    /// Failed deliveries to produce again.
    retry: Vec<(OwnedMessage, Token)>,
    /// Reused buffers for the message being produced.
    key: Vec<u8>,
    value: Vec<u8>,
    receive_errors: LogThrottle,
    delivery_errors: LogThrottle,
    /// Handles of the per-record metrics, registered once (a `counter!` per record looks its
    /// key up in the registry every time).
    records_in: Counter,
    records_out: Counter,
    /// End → acknowledged, counted into `latency_tally` per delivery report and added to the
    /// served histogram once per batch of reports.
    latency: Arc<FixedHistogram>,
    latency_tally: Tally,
    /// The index the attributor reads, for the readiness check of its watermark.
    index: SharedIndex,
    /// When readiness was last evaluated.
    health_checked: Option<Instant>,
}

type Consumer = StreamConsumer<Context>;

/// Runs the pipeline until `shutdown` is cancelled; `index` is fed by the inventory sources.
pub async fn run(
    settings: PipelineSettings,
    index: SharedIndex,
    parquet: Option<ParquetSink>,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let Clients {
        consumer,
        producer,
        shared,
    } = Clients::connect(&settings.kafka)?;
    info!(
        brokers = %settings.kafka.client.brokers,
        input = %settings.kafka.input_topic,
        group = %settings.kafka.group,
        output = ?settings.kafka.output_topic,
        parquet = parquet.is_some(),
        "enriching"
    );
    let latency = m::latency_histogram();
    let mut p = Pipeline {
        attributor: Attributor::new(index.clone(), None, settings.hold)
            .with_clock_skew(settings.clock_skew),
        index,
        health_checked: None,
        settings,
        producer,
        shared,
        parquet,
        offsets: OffsetTracker::default(),
        ready: Vec::new(),
        reports: Vec::new(),
        retry: Vec::new(),
        key: Vec::new(),
        value: Vec::new(),
        receive_errors: LogThrottle::default(),
        delivery_errors: LogThrottle::default(),
        records_in: counter!(m::RECORDS_IN),
        records_out: counter!(m::RECORDS_OUT),
        latency_tally: latency.tally(),
        latency,
    };
    if let Some(health) = &p.settings.health {
        declare_readiness(health);
        health.set_ready(NOT_STOPPING);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let room = p.offsets.pending() < p.settings.max_pending;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => p.maintain(&consumer).await?,
            message = consumer.recv(), if room => {
                p.received(message);
                // Whatever else librdkafka already holds is taken in the same turn, without a
                // trip through the select per message; the outputs are written once per batch.
                for _ in 1..BATCH {
                    if p.offsets.pending() >= p.settings.max_pending {
                        break;
                    }
                    match consumer.recv().now_or_never() {
                        Some(message) => p.received(message),
                        None => break,
                    }
                }
            }
        }
        p.write_ready().await?;
    }
    if let Some(health) = &p.settings.health {
        health.set_not_ready(
            NOT_STOPPING,
            "shutting down: flushing outputs and committing",
        );
    }
    p.shutdown(&consumer).await
}

impl Pipeline {
    fn received(&mut self, message: KafkaResult<BorrowedMessage<'_>>) {
        match message {
            Ok(message) => self.take(&message),
            Err(e) => self.receive_failed(&e),
        }
    }

    /// One input message: decoded and attributed (or held), or a dead letter. Read in place:
    /// only a dead letter is copied.
    fn take(&mut self, message: &BorrowedMessage<'_>) {
        self.records_in.increment(1);
        let (partition, offset) = (message.partition(), message.offset());
        self.offsets.consumed(partition, offset);
        let decoded = match message.payload() {
            None => Err(avro::DecodeError::Truncated("empty message")),
            Some(payload) => avro::decode_with(payload, &self.settings.kafka.input_schema_ids),
        };
        let mut token = Token {
            partition,
            offset,
            end_ns: 0,
        };
        match decoded {
            Ok(record) => {
                token.end_ns = record.end_ns;
                self.attributor
                    .push(record, token, Instant::now(), &mut self.ready);
            }
            Err(e) => self.dead_letter(message, &e, token),
        }
    }

    fn dead_letter(
        &mut self,
        message: &BorrowedMessage<'_>,
        error: &avro::DecodeError,
        token: Token,
    ) {
        let reason = dead_letter_reason(error);
        counter!(m::DLQ_TOTAL, "reason" => reason).increment(1);
        let source = format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        warn!(reason, %source, "undecodable message sent to the dead-letter topic: {error}");
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "flowlog.error",
            value: Some(&error.to_string()),
        });
        headers = headers.insert(Header {
            key: "flowlog.source",
            value: Some(&source),
        });
        let letter = OwnedMessage::new(
            message.payload().map(<[u8]>::to_vec),
            message.key().map(<[u8]>::to_vec),
            self.settings.kafka.dlq_topic.clone(),
            message.timestamp(),
            message.partition(),
            message.offset(),
            Some(headers),
        );
        self.offsets
            .written(token.partition, token.offset, true, None);
        self.retry.push((letter, token));
    }

    fn receive_failed(&mut self, e: &KafkaError) {
        counter!(m::KAFKA_ERRORS, "kind" => flowlog_kafka::error_kind(e)).increment(1);
        if self.receive_errors.hit() {
            warn!(
                count = self.receive_errors.count,
                "reading {}: {e}; retrying", self.settings.kafka.input_topic
            );
        }
    }

    /// Writes the attributed flows to Parquet and the output topic, and produces dead letters
    /// and failed deliveries again.
    async fn write_ready(&mut self) -> Result<(), PipelineError> {
        let ready = std::mem::take(&mut self.ready);
        // Taken once per batch, not per flow: `produce` borrows the pipeline mutably.
        let topic = self.settings.kafka.output_topic.clone();
        for (flow, token) in &ready {
            let parquet = match &mut self.parquet {
                Some(sink) => {
                    let n = sink.written();
                    sink.write(flow)?;
                    Some(n)
                }
                None => None,
            };
            self.offsets
                .written(token.partition, token.offset, topic.is_some(), parquet);
            if let Some(topic) = &topic {
                self.key.clear();
                avro::key_into(&flow.flow, &mut self.key);
                self.value.clear();
                enriched_avro::encode(flow, self.settings.kafka.output_schema_id, &mut self.value);
                let (key, value) = (
                    std::mem::take(&mut self.key),
                    std::mem::take(&mut self.value),
                );
                self.produce(topic, &key, &value, None, *token).await;
                (self.key, self.value) = (key, value);
            } else {
                self.records_out.increment(1);
            }
        }
        self.ready = ready;
        self.ready.clear();
        for (message, token) in std::mem::take(&mut self.retry) {
            self.produce(
                message.topic(),
                message.key().unwrap_or_default(),
                message.payload().unwrap_or_default(),
                message.headers().cloned(),
                token,
            )
            .await;
        }
        Ok(())
    }

    /// Hands one message to librdkafka, waiting while its queue is full.
    async fn produce(
        &mut self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: Option<OwnedHeaders>,
        token: Token,
    ) {
        loop {
            let mut record = BaseRecord::with_opaque_to(topic, Box::new(token))
                .key(key)
                .payload(value);
            if let Some(h) = &headers {
                record = record.headers(h.clone());
            }
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Backpressure: deliveries free the queue; apply them meanwhile so offsets
                    // keep moving.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    self.apply_reports();
                    if let Some(health) = &self.settings.health {
                        health.beat();
                    }
                }
                Err((e, _)) => {
                    // Not retriable by waiting (message too large, unknown topic): counted,
                    // logged, and retried at the next turn so that its offset is never stored.
                    counter!(m::DELIVERY_ERRORS, "kind" => flowlog_kafka::error_kind(&e))
                        .increment(1);
                    if self.delivery_errors.hit() {
                        warn!(topic, count = self.delivery_errors.count, "producing: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Applies delivery reports: acknowledged messages settle their offsets; failed ones are
    /// produced again.
    fn apply_reports(&mut self) {
        self.shared.take_reports(&mut self.reports);
        let now = now_ns();
        for report in self.reports.drain(..) {
            let t = report.token;
            match report.result {
                Ok(()) => {
                    self.offsets.acknowledged(t.partition, t.offset);
                    if t.end_ns > 0 {
                        self.records_out.increment(1);
                        self.latency_tally
                            .record(now.saturating_sub(t.end_ns) as f64 / 1e9);
                    }
                }
                Err((kind, message)) => {
                    counter!(m::DELIVERY_ERRORS, "kind" => kind.clone()).increment(1);
                    if self.delivery_errors.hit() {
                        warn!(
                            kind,
                            topic = message.topic(),
                            count = self.delivery_errors.count,
                            "delivery failed; producing it again"
                        );
                    }
                    self.retry.push((message, t));
                }
            }
        }
        self.latency.add(&mut self.latency_tally);
    }

    /// Every tick: held flows released, Parquet rolled when due, offsets stored.
    async fn maintain(&mut self, consumer: &Consumer) -> Result<(), PipelineError> {
        let now = Instant::now();
        self.attributor.release(now, &mut self.ready);
        if let Some(sink) = &mut self.parquet {
            if self.offsets.pending() >= self.settings.max_pending
                && sink.written() > sink.durable()
            {
                // Reading stopped on `max_pending`: what holds the offsets is the open Parquet
                // generation, so close it now instead of at its size or age.
                sink.roll().await?;
            } else {
                sink.maybe_roll(now).await?;
            }
        }
        self.offsets.revoke(&self.shared.take_revoked());
        self.apply_reports();
        self.store_offsets(consumer);
        self.report_health(consumer, now);
        Ok(())
    }

    /// Beats the health's loop and, every [`HEALTH_PERIOD`], exports how far behind the
    /// inventory is and re-evaluates readiness.
    fn report_health(&mut self, consumer: &Consumer, now: Instant) {
        if let Some(health) = &self.settings.health {
            health.beat();
        }
        if self
            .health_checked
            .is_some_and(|at| now.duration_since(at) < HEALTH_PERIOD)
        {
            return;
        }
        self.health_checked = Some(now);
        let wall = now_ns();
        let lag_of =
            |w: Option<u64>| w.map_or(f64::INFINITY, |w| wall.saturating_sub(w) as f64 / 1e9);
        // Each source against its own patience; the first one behind it, for the message.
        let mut behind: Option<(String, f64, Duration)> = None;
        let mut waiting_first: Option<String> = None;
        let caught_up_to = {
            let index = self.index.read();
            for (_, name, timing, watermark) in index.registered_sources() {
                let lag = lag_of(watermark);
                gauge!(m::SOURCE_LAG, "source" => name.to_owned()).set(lag);
                let patience = patience(self.settings.hold, timing);
                match watermark {
                    None => {
                        waiting_first.get_or_insert_with(|| name.to_owned());
                    }
                    Some(_) if lag > patience.as_secs_f64() => {
                        behind.get_or_insert_with(|| (name.to_owned(), lag, patience));
                    }
                    Some(_) => {}
                }
            }
            index.caught_up_to()
        };
        gauge!(m::INVENTORY_LAG).set(lag_of(caught_up_to));
        let Some(health) = &self.settings.health else {
            return;
        };
        match consumer.assignment() {
            Ok(list) if list.count() > 0 => health.set_ready(PARTITIONS_ASSIGNED),
            Ok(_) => health.set_not_ready(
                PARTITIONS_ASSIGNED,
                format!(
                    "no partition of {} assigned (more replicas than partitions, or the group is rebalancing)",
                    self.settings.kafka.input_topic
                ),
            ),
            Err(e) => health.set_not_ready(PARTITIONS_ASSIGNED, format!("reading the assignment: {e}")),
        }
        match (waiting_first, behind) {
            (Some(name), _) => health.set_not_ready(
                INVENTORY_CAUGHT_UP,
                format!("the inventory source {name} has not reported yet"),
            ),
            (None, Some((name, lag, patience))) => health.set_not_ready(
                INVENTORY_CAUGHT_UP,
                format!(
                    "the inventory source {name} is complete only up to {lag:.1} s ago, more than flows wait for it ({:.1} s)",
                    patience.as_secs_f64()
                ),
            ),
            (None, None) => health.set_ready(INVENTORY_CAUGHT_UP),
        }
    }

    fn store_offsets(&mut self, consumer: &Consumer) {
        let durable = self.parquet.as_ref().map_or(u64::MAX, ParquetSink::durable);
        let topic = &self.settings.kafka.input_topic;
        for (partition, next) in self.offsets.committable(durable) {
            // librdkafka's single-offset store takes the last processed offset and commits the
            // one after it.
            match consumer.store_offset(topic, partition, next - 1) {
                Ok(()) => counter!(m::OFFSETS_STORED).increment(1),
                // The partition was revoked meanwhile: its new owner reads it again.
                Err(e) => tracing::debug!(partition, next, "offset not stored: {e}"),
            }
        }
    }

    async fn shutdown(mut self, consumer: &Consumer) -> Result<(), PipelineError> {
        info!(
            held = self.attributor.held(),
            "stopping: closing Parquet files, flushing the producer, committing offsets"
        );
        self.write_ready().await?;
        if let Some(sink) = &mut self.parquet {
            sink.roll().await?;
        }
        let deadline = Instant::now() + self.settings.shutdown_wait;
        loop {
            let _ = self.producer.flush(Duration::from_millis(200));
            self.apply_reports();
            if self.retry.is_empty() || Instant::now() >= deadline {
                break;
            }
            self.write_ready().await?;
        }
        self.store_offsets(consumer);
        match consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing read since the last commit: nothing to commit.
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
            Err(e) => warn!("committing offsets at shutdown: {e}"),
            Ok(()) => {}
        }
        Ok(())
    }
}
