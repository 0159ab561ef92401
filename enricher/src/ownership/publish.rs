//! The publisher (`flowlog-inventory`): every change to the topic in order, each watermark only
//! once everything before it is acknowledged; and its restart, a replay of the topic.
use std::time::Duration;

use flowlog_diag::LogThrottle;
use flowlog_identity::OwnershipChange;
use flowlog_kafka::ClientSettings;
use metrics::counter;
use rdkafka::{
    error::KafkaError,
    producer::{FutureProducer, FutureRecord},
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::metrics as m;

use super::{
    OwnershipContext, OwnershipError, Polled, poll, reader,
    record::{OwnershipRecord, Tenures},
};

/// Changes published per produce batch, at most.
const BATCH: usize = 1024;

/// The publisher's librdkafka settings (before the `--kafka-config` options).
const PUBLISHER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("compression.type", "zstd"),
    ("linger.ms", "5"),
    ("allow.auto.create.topics", "false"),
];

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
