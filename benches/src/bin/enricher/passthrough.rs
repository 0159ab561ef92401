//! The baseline: a pass-through consumer/producer, what any Kafka-to-Kafka stage costs before
//! it does anything with a record. It reads the input topic from the beginning with the
//! enricher's consumer settings and produces every message, key and value unchanged, with the
//! enricher's producer settings, until the broker acknowledged `count` of them. It runs as its
//! own process (`enricher passthrough ...`), pinned by the harness to the enricher's CPU, so its
//! CPU (all threads, librdkafka's included) compares one to one with the enricher's.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use flowlog_enricher::kafka::{CONSUMER_DEFAULTS, PRODUCER_DEFAULTS};
use rdkafka::{
    ClientConfig, ClientContext, Message as _,
    consumer::{BaseConsumer, Consumer as _},
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer},
};

use crate::{Measured, cpu_time};

/// Counts acknowledged deliveries; a failed one is fatal (the broker is ours and healthy).
#[derive(Default)]
struct Acks {
    acked: AtomicU64,
    failed: AtomicU64,
}

struct AckContext(Arc<Acks>);

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Copies `count` messages from `input` to `output`; measured from the first message read to
/// the last acknowledgement.
pub fn run(
    brokers: &str,
    input: &str,
    output: &str,
    group: &str,
    count: u64,
) -> anyhow::Result<Measured> {
    let mut consumer_config = ClientConfig::new();
    for (k, v) in CONSUMER_DEFAULTS {
        consumer_config.set(*k, *v);
    }
    consumer_config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        // No acknowledgement-ordered store here: offsets stored as read, committed every second.
        .set("enable.auto.offset.store", "true");
    let consumer: BaseConsumer = consumer_config
        .create()
        .context("creating the pass-through consumer")?;
    consumer
        .subscribe(&[input])
        .with_context(|| format!("subscribing to {input}"))?;
    let mut producer_config = ClientConfig::new();
    for (k, v) in PRODUCER_DEFAULTS {
        producer_config.set(*k, *v);
    }
    producer_config.set("bootstrap.servers", brokers);
    let acks = Arc::new(Acks::default());
    let producer: ThreadedProducer<AckContext> = producer_config
        .create_with_context(AckContext(acks.clone()))
        .context("creating the pass-through producer")?;

    let mut read = 0u64;
    let mut started: Option<(Instant, Duration, Duration)> = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    while acks.acked.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            bail!(
                "pass-through: {read} read, {} acknowledged of {count} after 900 s",
                acks.acked.load(Ordering::Relaxed)
            );
        }
        if acks.failed.load(Ordering::Relaxed) > 0 {
            bail!("pass-through: a delivery failed");
        }
        if read >= count {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match message {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(_)) => continue,
            Err(e) => return Err(e).context("pass-through: reading the input"),
        };
        if started.is_none() {
            started = Some((Instant::now(), cpu_time(), librdkafka_cpu()?));
        }
        read += 1;
        let mut record = BaseRecord::to(output).payload(message.payload().unwrap_or_default());
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e).context("pass-through: producing"),
            }
        }
    }
    let (start, cpu0, rdk0) = started.context("nothing was read")?;
    let measured = Measured {
        records: count,
        wall: start.elapsed(),
        cpu: cpu_time() - cpu0,
        librdkafka: librdkafka_cpu()? - rdk0,
    };
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the pass-through producer")?;
    Ok(measured)
}

/// CPU time of this process's librdkafka threads so far.
fn librdkafka_cpu() -> anyhow::Result<Duration> {
    let ticks = crate::procfs::librdkafka_ticks(None)? as f64;
    Ok(Duration::from_secs_f64(
        ticks / crate::procfs::clock_ticks_per_second()? as f64,
    ))
}
