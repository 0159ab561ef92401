//! `flows.ownership`: the inventory on a compacted Kafka topic, so that API servers are watched
//! by **one** inventory process (`flowlog-inventory`) and not once per enricher replica. Every
//! enricher builds its index by replaying the topic at start-up and then following it
//! ([`OwnershipTopicSource`]).
//!
//! The topic holds **tenures**, not raw changes: one message per `(source, owner, prefix, from)`
//! whose value is the tenure's latest state — open (`to_ns` null), then closed (`to_ns` set).
//! Compaction keeps the latest state of each tenure, so a replay still sees every interval of
//! the retention window, opened and closed, which a topic of raw Open/Close changes would lose
//! (compaction would keep only the Close). Tenures closed longer ago than the retention are
//! deleted with tombstones. A span in which an owner *may* have held a prefix (a change its
//! source could date only that well) is one message too (`uncertain/…`), expired the same way.
//! Each source's watermark is one more key (`watermark/<source>`), with how the source dates
//! its changes (`period_ns` for a polled source such as EC2), so that every enricher holds each
//! flow only for the sources that could still change it, as it would reading the sources itself.
//!
//! Order matters (a watermark must not overtake the change before it), so the topic has **one
//! partition** and the publisher writes everything to it in order, each message acknowledged
//! before the next batch. Create it with `cleanup.policy=compact`.
//!
//! Broker outages and restarts stop neither side: the publisher produces again until the
//! broker acknowledges, and the follower keeps reading (librdkafka reconnects) or keeps trying to
//! open the topic, while the index holds flows for it; a record that does not parse is counted,
//! logged and skipped. Every client error is counted in [`crate::metrics::OWNERSHIP_KAFKA_ERRORS`].
//!
//! Modules: [`record`] (the topic's messages and the publisher's tenures), `publish` (the
//! publisher and its restart: [`publish`], [`replay_tenures`]), `follow` (an enricher's view:
//! [`OwnershipTopicSource`]); this file holds what both sides' Kafka clients share.
use std::time::Duration;

use flowlog_diag::LogThrottle;
use flowlog_kafka::{ClientErrors, ClientSettings};
use metrics::counter;
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::KafkaError,
};

use crate::metrics as m;

mod follow;
mod publish;
pub mod record;

pub use follow::{OwnershipTopicSource, relayed_name};
pub use publish::{publish, replay_tenures};
pub use record::{OwnershipRecord, Tenures};

/// The source name under which an enricher's index sees the topic (and whose watermark gates
/// its flows).
pub const OWNERSHIP_SOURCE: &str = "ownership";

/// Why the publisher or the reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("creating the Kafka client for {brokers}")]
    Client { brokers: String, source: KafkaError },
    #[error("reading `{topic}`")]
    Read { topic: String, source: KafkaError },
    #[error(transparent)]
    Topic(#[from] flowlog_kafka::TopicError),
}

/// The ownership topic's client context: librdkafka's log lines and client errors go through
/// `flowlog_kafka` (counted, logged once a minute) instead of rdkafka's default, which logs
/// every error — including the end-of-partition events that the reader asks for and handles —
/// at ERROR level.
pub struct OwnershipContext {
    errors: ClientErrors,
}

impl OwnershipContext {
    fn new(brokers: &str) -> Self {
        Self {
            errors: ClientErrors::new(m::OWNERSHIP_KAFKA_ERRORS, brokers, "retrying"),
        }
    }
}

impl ClientContext for OwnershipContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.errors.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Reaching the end of the partition is how the reader knows a replay is complete.
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            self.errors.report(&error, reason);
        }
    }
}

impl ConsumerContext for OwnershipContext {}

/// The reader's librdkafka settings (before the `--kafka-config` options): no group offsets,
/// end-of-partition events (how a replay knows it is complete), fetches answered within 10 ms.
const READER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    // An offset gone from the compacted topic (compaction ran while the reader was cut off):
    // read on from the oldest left rather than skip to the end (re-reading is harmless, the
    // index ignores what it already holds).
    ("auto.offset.reset", "earliest"),
    ("enable.partition.eof", "true"),
    ("fetch.wait.max.ms", "10"),
    ("allow.auto.create.topics", "false"),
];

/// A consumer that reads partition 0 of `topic` from the beginning, with no group offsets.
pub(super) fn reader(
    client: &ClientSettings,
    topic: &str,
) -> Result<BaseConsumer<OwnershipContext>, OwnershipError> {
    let mut config = client.client_config(READER_DEFAULTS, &[]);
    config.set(
        "group.id",
        format!("flowlog-ownership-{}", uuid::Uuid::new_v4()),
    );
    let consumer: BaseConsumer<OwnershipContext> = config
        .create_with_context(OwnershipContext::new(&client.brokers))
        .map_err(|source| OwnershipError::Client {
            brokers: client.brokers.clone(),
            source,
        })?;
    // The consumer's events (log lines among them) reach the context only when it is polled;
    // nothing is assigned yet, so polling returns no message.
    let serve = || {
        for _ in 0..64 {
            if consumer.poll(Duration::ZERO).is_none() {
                break;
            }
        }
    };
    flowlog_kafka::check_topic(
        consumer.client(),
        &config,
        topic,
        Duration::from_secs(10),
        &consumer.context().errors,
        serve,
    )?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("a valid offset");
    consumer
        .assign(&list)
        .map_err(|source| OwnershipError::Read {
            topic: topic.to_string(),
            source,
        })?;
    Ok(consumer)
}

/// One poll's outcome: a record or a tombstone (`None`), the end of the partition, or nothing
/// (also what a client error or a malformed record comes to: see [`poll`]).
pub(super) enum Polled {
    Record(Option<OwnershipRecord>),
    End,
    Nothing,
}

/// One poll of the reader. Nothing read stops it: librdkafka reconnects by itself after a
/// client error (brokers down, connections reset), which is counted and logged by the
/// context's [`ClientErrors`]; a record that does not parse is counted in
/// [`crate::metrics::OWNERSHIP_MALFORMED`], logged (once, then at most once a minute) and skipped, so that one
/// bad record cannot end attribution for every flow after it.
pub(super) fn poll(
    consumer: &BaseConsumer<OwnershipContext>,
    topic: &str,
    wait: Duration,
    malformed: &mut LogThrottle,
) -> Polled {
    match consumer.poll(wait) {
        None => Polled::Nothing,
        Some(Err(KafkaError::PartitionEOF(_))) => Polled::End,
        Some(Err(e)) => {
            consumer
                .context()
                .errors
                .report(&e, &format!("reading {topic}: {e}"));
            Polled::Nothing
        }
        Some(Ok(m)) => match m.payload() {
            None => Polled::Record(None),
            Some(p) => match serde_json::from_slice(p) {
                Ok(record) => Polled::Record(Some(record)),
                Err(e) => {
                    counter!(m::OWNERSHIP_MALFORMED).increment(1);
                    if malformed.hit() {
                        tracing::error!(
                            topic,
                            offset = m.offset(),
                            count = malformed.count,
                            "skipping an ownership record that does not parse: {e}"
                        );
                    }
                    Polled::Nothing
                }
            },
        },
    }
}
