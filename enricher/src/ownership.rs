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
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use flowlog_diag::LogThrottle;
use flowlog_identity::{
    BoxFuture, InventorySource, OwnershipChange, SourceError, SourceRegistry, Timing,
};
use flowlog_kafka::{ClientErrors, ClientSettings};
use flowlog_record::Identity;
use ipnet::IpNet;
use metrics::counter;
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::KafkaError,
    producer::{FutureProducer, FutureRecord},
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics as m;

/// The source name under which an enricher's index sees the topic (and whose watermark gates
/// its flows).
pub const OWNERSHIP_SOURCE: &str = "ownership";

/// Changes published per produce batch, at most.
const BATCH: usize = 1024;

/// One message of the topic.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OwnershipRecord {
    /// `owner` held `prefix` from `from_ns`, until `to_ns` (still holds it if null).
    Tenure {
        source: String,
        owner: String,
        prefix: IpNet,
        identity: Arc<Identity>,
        from_ns: u64,
        to_ns: Option<u64>,
    },
    /// `owner` may have held `prefix` during `[from_ns, to_ns)`: a change the source could
    /// date only that well ([`OwnershipChange::Uncertain`]). Expires like a closed tenure.
    Uncertain {
        source: String,
        owner: String,
        prefix: IpNet,
        identity: Arc<Identity>,
        from_ns: u64,
        to_ns: u64,
    },
    /// `source` had reported everything up to `at_ns`. `period_ns`: the source polls that
    /// often ([`Timing::Polled`]); absent for a source whose changes may be dated at any time
    /// after its watermark ([`Timing::Continuous`]; also what records from before this field
    /// mean).
    Watermark {
        source: String,
        at_ns: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        period_ns: Option<u64>,
    },
}

impl OwnershipRecord {
    /// The compaction key: a tenure's identity, or the source's watermark slot.
    pub fn key(&self) -> String {
        match self {
            OwnershipRecord::Tenure {
                source,
                owner,
                prefix,
                from_ns,
                ..
            } => tenure_key(source, owner, prefix, *from_ns),
            OwnershipRecord::Uncertain {
                source,
                owner,
                prefix,
                from_ns,
                to_ns,
                ..
            } => format!("uncertain/{source}/{owner}/{prefix}/{from_ns}/{to_ns}"),
            OwnershipRecord::Watermark { source, .. } => format!("watermark/{source}"),
        }
    }

    /// The changes this state means to an index (a closed tenure is its Open and its Close).
    pub fn changes(&self) -> Vec<OwnershipChange> {
        match self {
            OwnershipRecord::Tenure {
                source,
                owner,
                prefix,
                identity,
                from_ns,
                to_ns,
            } => {
                let mut out = vec![OwnershipChange::Open {
                    source: source.clone(),
                    owner: owner.clone(),
                    prefix: *prefix,
                    identity: Arc::clone(identity),
                    at_ns: *from_ns,
                }];
                if let Some(to) = to_ns {
                    out.push(OwnershipChange::Close {
                        source: source.clone(),
                        owner: owner.clone(),
                        prefix: *prefix,
                        at_ns: *to,
                    });
                }
                out
            }
            OwnershipRecord::Uncertain {
                source,
                owner,
                prefix,
                identity,
                from_ns,
                to_ns,
            } => vec![OwnershipChange::Uncertain {
                source: source.clone(),
                owner: owner.clone(),
                prefix: *prefix,
                identity: Arc::clone(identity),
                from_ns: *from_ns,
                to_ns: *to_ns,
            }],
            OwnershipRecord::Watermark { source, at_ns, .. } => {
                vec![OwnershipChange::Watermark {
                    source: source.clone(),
                    at_ns: *at_ns,
                }]
            }
        }
    }

    /// How the source of a watermark record dates its changes.
    pub fn timing(&self) -> Timing {
        match self {
            OwnershipRecord::Watermark {
                period_ns: Some(p), ..
            } => Timing::Polled {
                period: Duration::from_nanos(*p),
            },
            _ => Timing::Continuous,
        }
    }
}

fn tenure_key(source: &str, owner: &str, prefix: &IpNet, from_ns: u64) -> String {
    format!("tenure/{source}/{owner}/{prefix}/{from_ns}")
}

/// An open tenure the publisher knows of.
#[derive(Debug, Clone)]
struct Open {
    identity: Arc<Identity>,
    from_ns: u64,
    /// Confirmed by the source since this publisher started (an Open was received). Tenures
    /// replayed from the topic but never confirmed are closed at the source's first watermark:
    /// the owner went away while no publisher was running.
    confirmed: bool,
}

/// The publisher's state: open tenures per `(source, owner, prefix)`, and closed ones awaiting
/// expiry. Turns the sources' changes into the topic's records.
#[derive(Debug, Default)]
pub struct Tenures {
    open: HashMap<(String, String, IpNet), Open>,
    /// Closed tenures by close time → keys, for tombstones after the retention.
    closed: BTreeMap<u64, Vec<String>>,
    /// Sources that have sent a watermark since start.
    live: HashSet<String>,
    /// How each source dates its changes, published with its watermarks.
    timings: HashMap<String, Timing>,
}

impl Tenures {
    /// Rebuilds the state from the topic's records (a restart): what was open is open again,
    /// unconfirmed until its source says so.
    pub fn replay(&mut self, record: &OwnershipRecord) {
        if let OwnershipRecord::Uncertain { to_ns, .. } = record {
            self.closed.entry(*to_ns).or_default().push(record.key());
        }
        if let OwnershipRecord::Tenure {
            source,
            owner,
            prefix,
            identity,
            from_ns,
            to_ns,
        } = record
        {
            let key = (source.clone(), owner.clone(), *prefix);
            match to_ns {
                None => {
                    self.open.insert(
                        key,
                        Open {
                            identity: Arc::clone(identity),
                            from_ns: *from_ns,
                            confirmed: false,
                        },
                    );
                }
                Some(to) => {
                    self.open.remove(&key);
                    self.closed.entry(*to).or_default().push(record.key());
                }
            }
        }
    }

    /// Declares how `source` dates its changes (its [`InventorySource::timing`]), published
    /// with its watermarks; a source not declared is published as continuous.
    pub fn set_timing(&mut self, source: &str, timing: Timing) {
        self.timings.insert(source.to_owned(), timing);
    }

    /// Open tenures now.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// The records one change from a source makes.
    pub fn apply(&mut self, change: OwnershipChange) -> Vec<OwnershipRecord> {
        let mut out = Vec::new();
        match change {
            OwnershipChange::Open {
                source,
                owner,
                prefix,
                identity,
                at_ns,
            } => {
                let key = (source, owner, prefix);
                if let Some(open) = self.open.get_mut(&key) {
                    if open.identity == identity {
                        // A re-list re-sends what is open: the earlier start stands.
                        open.confirmed = true;
                        return out;
                    }
                    // The owner's identity changed: its tenure ends and a new one starts.
                    let old = self.open.remove(&key).expect("present");
                    out.push(self.closed_record(&key, old, at_ns));
                }
                out.push(OwnershipRecord::Tenure {
                    source: key.0.clone(),
                    owner: key.1.clone(),
                    prefix: key.2,
                    identity: Arc::clone(&identity),
                    from_ns: at_ns,
                    to_ns: None,
                });
                self.open.insert(
                    key,
                    Open {
                        identity,
                        from_ns: at_ns,
                        confirmed: true,
                    },
                );
            }
            OwnershipChange::Close {
                source,
                owner,
                prefix,
                at_ns,
            } => {
                let key = (source, owner, prefix);
                match self.open.remove(&key) {
                    Some(open) => out.push(self.closed_record(&key, open, at_ns)),
                    None => counter!(m::INVENTORY_UNMATCHED_CLOSES).increment(1),
                }
            }
            OwnershipChange::Uncertain {
                source,
                owner,
                prefix,
                identity,
                from_ns,
                to_ns,
            } => {
                let record = OwnershipRecord::Uncertain {
                    source,
                    owner,
                    prefix,
                    identity,
                    from_ns,
                    to_ns,
                };
                self.closed.entry(to_ns).or_default().push(record.key());
                out.push(record);
            }
            OwnershipChange::Watermark { source, at_ns } => {
                if self.live.insert(source.clone()) {
                    // The source's first complete view since start: what it did not confirm is
                    // gone, released at some time before now — closed here, at the earliest
                    // time we can vouch for.
                    let stale: Vec<_> = self
                        .open
                        .iter()
                        .filter(|((s, _, _), o)| *s == source && !o.confirmed)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in stale {
                        let open = self.open.remove(&key).expect("present");
                        out.push(self.closed_record(&key, open, at_ns));
                    }
                }
                let period_ns = match self.timings.get(&source) {
                    Some(t @ Timing::Polled { .. }) => Some(t.period_ns()),
                    _ => None,
                };
                out.push(OwnershipRecord::Watermark {
                    source,
                    at_ns,
                    period_ns,
                });
            }
        }
        out
    }

    fn closed_record(
        &mut self,
        (source, owner, prefix): &(String, String, IpNet),
        open: Open,
        at_ns: u64,
    ) -> OwnershipRecord {
        let record = OwnershipRecord::Tenure {
            source: source.clone(),
            owner: owner.clone(),
            prefix: *prefix,
            identity: open.identity,
            from_ns: open.from_ns,
            to_ns: Some(at_ns.max(open.from_ns)),
        };
        self.closed.entry(at_ns).or_default().push(record.key());
        record
    }

    /// Keys of tenures that closed before `before_ns`, forgotten here: publish tombstones for
    /// them so that compaction deletes them.
    pub fn expire(&mut self, before_ns: u64) -> Vec<String> {
        let keep = self.closed.split_off(&before_ns);
        std::mem::replace(&mut self.closed, keep)
            .into_values()
            .flatten()
            .collect()
    }
}

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

/// The publisher's librdkafka settings (before the `--kafka-config` options).
const PUBLISHER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("compression.type", "zstd"),
    ("linger.ms", "5"),
    ("allow.auto.create.topics", "false"),
];

/// A consumer that reads partition 0 of `topic` from the beginning, with no group offsets.
fn reader(
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
enum Polled {
    Record(Option<OwnershipRecord>),
    End,
    Nothing,
}

/// One poll of the reader. Nothing read stops it: librdkafka reconnects by itself after a
/// client error (brokers down, connections reset), which is counted and logged by the
/// context's [`ClientErrors`]; a record that does not parse is counted in
/// [`crate::metrics::OWNERSHIP_MALFORMED`], logged (once, then at most once a minute) and skipped, so that one
/// bad record cannot end attribution for every flow after it.
fn poll(
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

/// Reads `topic` to its current end: the publisher's state before a restart.
pub fn replay_tenures(client: &ClientSettings, topic: &str) -> Result<Tenures, OwnershipError> {
    let consumer = reader(client, topic)?;
    let mut tenures = Tenures::default();
    let mut records = 0u64;
    let mut malformed = LogThrottle::default();
    loop {
        match poll(&consumer, topic, Duration::from_millis(500), &mut malformed) {
            Polled::Record(Some(record)) => {
                records += 1;
                tenures.replay(&record);
            }
            Polled::Record(None) | Polled::Nothing => {}
            Polled::End => break,
        }
    }
    info!(
        topic,
        records,
        open = tenures.open(),
        "ownership topic replayed"
    );
    Ok(tenures)
}

/// Publishes every change of `changes` to `topic` (partition 0) in order, each watermark only
/// once everything before it is acknowledged; expires tenures closed longer than `retention` ago.
/// Runs until the channel closes (the sources stopped). `acknowledged` is told of every
/// acknowledged write — `Some(source)` for a source's watermark, `None` for tenures — so that
/// the caller knows publishing works (its readiness).
pub async fn publish(
    client: &ClientSettings,
    topic: &str,
    mut tenures: Tenures,
    mut changes: mpsc::Receiver<OwnershipChange>,
    retention: Duration,
    mut acknowledged: impl FnMut(Option<&str>) + Send,
) -> Result<(), OwnershipError> {
    let producer: FutureProducer<OwnershipContext> = client
        .client_config(PUBLISHER_DEFAULTS, &[])
        .create_with_context(OwnershipContext::new(&client.brokers))
        .map_err(|source| OwnershipError::Client {
            brokers: client.brokers.clone(),
            source,
        })?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut errors = LogThrottle::default();
    while changes.recv_many(&mut batch, BATCH).await > 0 {
        let mut messages: Vec<Outgoing> = Vec::new();
        for change in batch.drain(..) {
            for record in tenures.apply(change) {
                messages.push(Outgoing {
                    key: record.key(),
                    value: Some(serde_json::to_vec(&record).expect("records serialize")),
                    watermark: match &record {
                        OwnershipRecord::Watermark { source, .. } => Some(source.clone()),
                        OwnershipRecord::Tenure { .. } | OwnershipRecord::Uncertain { .. } => None,
                    },
                });
            }
        }
        let horizon = flowlog_identity::now_ns().saturating_sub(retention.as_nanos() as u64);
        messages.extend(tenures.expire(horizon).into_iter().map(|key| Outgoing {
            key,
            value: None,
            watermark: None,
        }));
        // Tenures between two watermarks go out together (the idempotent producer keeps their
        // order on the one partition); a watermark goes out only once everything before it is
        // acknowledged, so no reader ever sees a watermark ahead of a change it covers.
        for run in messages.split_inclusive(|m| m.watermark.is_some()) {
            let (changes, watermark) = match run.split_last() {
                Some((last, rest)) if last.watermark.is_some() => (rest, Some(last)),
                _ => (run, None),
            };
            if !changes.is_empty() {
                send_in_order(&producer, topic, changes, &mut errors).await;
                acknowledged(None);
            }
            if let Some(watermark) = watermark {
                send_in_order(
                    &producer,
                    topic,
                    std::slice::from_ref(watermark),
                    &mut errors,
                )
                .await;
                acknowledged(watermark.watermark.as_deref());
            }
        }
    }
    Ok(())
}

/// One message for the ownership topic (`value: None` is a tombstone).
struct Outgoing {
    key: String,
    value: Option<Vec<u8>>,
    /// The source whose watermark this is (`None`: a tenure or a tombstone).
    watermark: Option<String>,
}

/// Sends `messages` to partition 0 of `topic` all at once and waits for every acknowledgement.
/// If any failed, everything from the first failure on is sent again one at a time, each
/// acknowledged before the next: a key's latest message on the topic is then its latest
/// state again, whatever got through out of order meanwhile (a tenure's open re-sent after its
/// close got through is followed by that close, re-sent too).
async fn send_in_order(
    producer: &FutureProducer<OwnershipContext>,
    topic: &str,
    messages: &[Outgoing],
    errors: &mut LogThrottle,
) {
    fn record<'a>(topic: &'a str, m: &'a Outgoing) -> FutureRecord<'a, str, [u8]> {
        let record = FutureRecord::to(topic).partition(0).key(m.key.as_str());
        match &m.value {
            Some(v) => record.payload(v.as_slice()),
            None => record,
        }
    }
    // Enqueued all at once (send_result does not wait), then acknowledged in order.
    let deliveries: Vec<_> = messages
        .iter()
        .map(|m| producer.send_result(record(topic, m)).map_err(|(e, _)| e))
        .collect();
    let mut first_failure = None;
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let outcome = match delivery {
            Ok(acknowledged) => match acknowledged.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_canceled) => Err(KafkaError::Canceled),
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => counter!(m::INVENTORY_PUBLISHED).increment(1),
            Err(e) => {
                note_publish_error(topic, &e, errors);
                first_failure.get_or_insert(i);
            }
        }
    }
    let Some(from) = first_failure else { return };
    for m in &messages[from..] {
        loop {
            match producer
                .send(record(topic, m), Duration::from_secs(30))
                .await
            {
                Ok(_) => {
                    counter!(m::INVENTORY_PUBLISHED).increment(1);
                    break;
                }
                Err((e, _)) => {
                    note_publish_error(topic, &e, errors);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

fn note_publish_error(topic: &str, e: &KafkaError, errors: &mut LogThrottle) {
    counter!(m::INVENTORY_PUBLISH_ERRORS, "kind" => flowlog_kafka::error_kind(e)).increment(1);
    if errors.hit() {
        warn!(
            topic,
            count = errors.count,
            "publishing ownership: {e}; retrying"
        );
    }
}

/// An enricher's view of the topic, as an inventory source named [`OWNERSHIP_SOURCE`]: replays
/// it from the beginning, then follows it. Each upstream source (the ones `flowlog-inventory`
/// runs) is relayed under the name `ownership/<source>`: its changes, its watermarks, and its
/// timing, registered in the index ([`SourceRegistry`]) when its first watermark is read, so
/// that each flow waits only for the upstream sources that could still change it (a flow to a
/// static range does not wait for EC2's next poll). The follower's own watermark gates every
/// flow until the replay has reached the end of the topic (until then, the index is not
/// complete for any time), then stands at the end of time: from there the upstream sources'
/// watermarks gate.
pub struct OwnershipTopicSource {
    client: ClientSettings,
    topic: String,
    registry: Option<SourceRegistry>,
}

impl OwnershipTopicSource {
    /// `client`: the brokers, or [`ClientSettings`] with the `--kafka-config` options.
    pub fn new(client: impl Into<ClientSettings>, topic: impl Into<String>) -> Self {
        Self {
            client: client.into(),
            topic: topic.into(),
            registry: None,
        }
    }
}

/// The name an upstream source of the topic has in an enricher's index.
pub fn relayed_name(upstream: &str) -> String {
    format!("{OWNERSHIP_SOURCE}/{upstream}")
}

/// A change read from the topic, with its source renamed as relayed.
fn relayed(mut change: OwnershipChange) -> OwnershipChange {
    let source = change.source_mut();
    *source = relayed_name(source);
    change
}

impl InventorySource for OwnershipTopicSource {
    fn name(&self) -> &str {
        OWNERSHIP_SOURCE
    }

    fn relay_into(&mut self, registry: SourceRegistry) {
        self.registry = Some(registry);
    }

    fn run(
        self: Box<Self>,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let Self {
                client,
                topic,
                registry,
            } = *self;
            let (tx, mut rx) = mpsc::channel::<Polled>(4096);
            // librdkafka's poll blocks: a thread of its own feeds the async side.
            let stop = shutdown.clone();
            let reading = tokio::task::spawn_blocking(move || follow(&client, &topic, &stop, &tx));
            // Each upstream source's timing as registered.
            let mut upstream: BTreeMap<String, Timing> = BTreeMap::new();
            let mut caught_up = false;
            let mut opened = false;
            loop {
                let polled = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = rx.recv() => p,
                };
                let Some(polled) = polled else { break };
                match polled {
                    Polled::Record(Some(record)) => {
                        if let OwnershipRecord::Watermark { source, .. } = &record {
                            let timing = record.timing();
                            if upstream.get(source) != Some(&timing) {
                                // Registered before its watermark is applied: until then it
                                // holds flows back (it has reported nothing), never lets one
                                // through early.
                                if let Some(registry) = &registry {
                                    registry.register(&relayed_name(source), timing);
                                }
                                upstream.insert(source.clone(), timing);
                            }
                        }
                        for change in record.changes() {
                            if changes.send(relayed(change)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    Polled::Record(None) | Polled::Nothing => {}
                    Polled::End => caught_up = true,
                }
                // Once the replay is complete and some upstream source has reported, the
                // upstream sources' own watermarks gate the flows.
                if caught_up && !opened && !upstream.is_empty() {
                    opened = true;
                    let change = OwnershipChange::Watermark {
                        source: OWNERSHIP_SOURCE.to_string(),
                        at_ns: u64::MAX,
                    };
                    if changes.send(change).await.is_err() {
                        return Ok(());
                    }
                }
            }
            let _ = reading.await;
            Ok(())
        })
    }
}

/// Longest wait between two attempts to open the ownership topic.
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// The follower's reading thread: opens the topic (again and again, backing off, while the
/// brokers cannot be reached or refuse: the index holds flows meanwhile, and `/readyz` and
/// [`crate::metrics::OWNERSHIP_KAFKA_ERRORS`] say why), then reads it until `stop`, through broker outages and
/// restarts, handing what it reads to `tx`. Never gives up: a follower that stopped would leave
/// every later flow `unknown` until the process restarted.
fn follow(
    client: &ClientSettings,
    topic: &str,
    stop: &CancellationToken,
    tx: &mpsc::Sender<Polled>,
) {
    let opening = ClientErrors::new(
        m::OWNERSHIP_KAFKA_ERRORS,
        client.brokers.clone(),
        "retrying",
    );
    let mut delay = Duration::from_secs(1);
    let consumer = loop {
        if stop.is_cancelled() {
            return;
        }
        match reader(client, topic) {
            Ok(consumer) => break consumer,
            Err(e) => {
                let what = format!("opening {topic}: {}", flowlog_diag::error_chain(&e));
                opening.note("open_failed", &what);
                let until = std::time::Instant::now() + delay;
                while std::time::Instant::now() < until && !stop.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                delay = (delay * 2).min(REOPEN_MAX);
            }
        }
    };
    let mut malformed = LogThrottle::default();
    while !stop.is_cancelled() {
        let polled = poll(&consumer, topic, Duration::from_millis(100), &mut malformed);
        if !matches!(polled, Polled::Nothing) && tx.blocking_send(polled).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(name: &str) -> Arc<Identity> {
        Arc::new(Identity {
            name: name.to_string(),
            source: "static".to_string(),
            ..Identity::default()
        })
    }

    fn open(owner: &str, name: &str, at: u64) -> OwnershipChange {
        OwnershipChange::Open {
            source: "k".into(),
            owner: owner.into(),
            prefix: "10.0.0.1/32".parse().unwrap(),
            identity: identity(name),
            at_ns: at,
        }
    }

    fn close(owner: &str, at: u64) -> OwnershipChange {
        OwnershipChange::Close {
            source: "k".into(),
            owner: owner.into(),
            prefix: "10.0.0.1/32".parse().unwrap(),
            at_ns: at,
        }
    }

    fn tenure(owner: &str, name: &str, from: u64, to: Option<u64>) -> OwnershipRecord {
        OwnershipRecord::Tenure {
            source: "k".into(),
            owner: owner.into(),
            prefix: "10.0.0.1/32".parse().unwrap(),
            identity: identity(name),
            from_ns: from,
            to_ns: to,
        }
    }

    #[test]
    fn tenures_open_close_and_relists() {
        let mut t = Tenures::default();
        assert_eq!(
            t.apply(open("a", "A", 10)),
            vec![tenure("a", "A", 10, None)]
        );
        // A re-list re-sends the Open: nothing new.
        assert_eq!(t.apply(open("a", "A", 15)), vec![]);
        // The identity changed: the tenure ends, a new one starts.
        assert_eq!(
            t.apply(open("a", "A2", 20)),
            vec![tenure("a", "A", 10, Some(20)), tenure("a", "A2", 20, None)]
        );
        assert_eq!(
            t.apply(close("a", 30)),
            vec![tenure("a", "A2", 20, Some(30))]
        );
        assert_eq!(t.apply(close("a", 31)), vec![], "unmatched close");
        assert_eq!(
            t.expire(25),
            vec![tenure("a", "A", 10, None).key()],
            "closed at 20 < 25"
        );
        assert_eq!(t.expire(100), vec![tenure("a", "A2", 20, None).key()]);
    }

    /// A span in which an owner may have held a prefix is one record of its own, expanded back
    /// to the same change, replayed and expired like a closed tenure.
    #[test]
    fn uncertain_spans_are_records_that_expire() {
        let change = OwnershipChange::Uncertain {
            source: "k".into(),
            owner: "a".into(),
            prefix: "10.0.0.1/32".parse().unwrap(),
            identity: identity("A"),
            from_ns: 10,
            to_ns: 40,
        };
        let mut t = Tenures::default();
        let records = t.apply(change.clone());
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].key(), "uncertain/k/a/10.0.0.1/32/10/40");
        let json = serde_json::to_string(&records[0]).unwrap();
        let back: OwnershipRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.changes(), vec![change]);
        assert_eq!(t.open(), 0, "a span opens no tenure");
        assert_eq!(t.expire(40), Vec::<String>::new(), "not before its end");
        assert_eq!(t.expire(41), vec![records[0].key()]);
        let mut replayed = Tenures::default();
        replayed.replay(&back);
        assert_eq!(replayed.expire(41), vec![records[0].key()]);
    }

    #[test]
    fn a_restart_closes_what_the_source_no_longer_confirms() {
        let mut t = Tenures::default();
        t.replay(&tenure("gone", "G", 5, None));
        t.replay(&tenure("kept", "K", 6, None));
        t.replay(&tenure("old", "O", 1, Some(2)));
        assert_eq!(t.open(), 2);
        assert_eq!(t.apply(open("kept", "K", 50)), vec![]);
        let w = OwnershipChange::Watermark {
            source: "k".into(),
            at_ns: 60,
        };
        assert_eq!(
            t.apply(w.clone()),
            vec![
                tenure("gone", "G", 5, Some(60)),
                OwnershipRecord::Watermark {
                    source: "k".into(),
                    at_ns: 60,
                    period_ns: None,
                }
            ]
        );
        assert_eq!(t.open(), 1);
        // Later watermarks close nothing.
        t.replay(&tenure("late", "L", 7, None));
        assert_eq!(t.apply(w).len(), 1);
    }

    /// A polled source's watermarks carry its period, which a follower registers; records
    /// written before the field existed read as a continuous source.
    #[test]
    fn watermarks_carry_the_timing_of_their_source() {
        let mut t = Tenures::default();
        t.set_timing(
            "ec2",
            Timing::Polled {
                period: Duration::from_secs(30),
            },
        );
        t.set_timing("k", Timing::Continuous);
        let w = |source: &str| OwnershipChange::Watermark {
            source: source.into(),
            at_ns: 7,
        };
        let records: Vec<OwnershipRecord> = ["ec2", "k", "undeclared"]
            .into_iter()
            .flat_map(|s| t.apply(w(s)))
            .collect();
        let json: Vec<String> = records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        assert_eq!(
            json,
            [
                r#"{"type":"watermark","source":"ec2","at_ns":7,"period_ns":30000000000}"#,
                r#"{"type":"watermark","source":"k","at_ns":7}"#,
                r#"{"type":"watermark","source":"undeclared","at_ns":7}"#,
            ]
        );
        let read: OwnershipRecord = serde_json::from_str(&json[0]).unwrap();
        assert_eq!(
            read.timing(),
            Timing::Polled {
                period: Duration::from_secs(30)
            }
        );
        let old: OwnershipRecord =
            serde_json::from_str(r#"{"type":"watermark","source":"k","at_ns":7}"#).unwrap();
        assert_eq!(old.timing(), Timing::Continuous);
        assert_eq!(
            relayed(w("ec2")),
            OwnershipChange::Watermark {
                source: "ownership/ec2".into(),
                at_ns: 7
            }
        );
    }

    #[test]
    fn records_round_trip_as_json_and_expand_to_changes() {
        let r = tenure("a", "A", 10, Some(20));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<OwnershipRecord>(&json).unwrap(), r);
        assert_eq!(r.changes(), vec![open("a", "A", 10), close("a", 20)]);
        assert_eq!(r.key(), "tenure/k/a/10.0.0.1/32/10");
    }
}
