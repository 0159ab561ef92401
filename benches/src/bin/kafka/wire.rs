//! Bytes on the wire per flow record: captured records go through the agent's real
//! [`KafkaSink`] (spool, `acks=all`, idempotence, zstd, the shipped batching unless a condition
//! overrides it) to a fresh topic, at a given rate, and librdkafka's own statistics
//! (`statistics.interval.ms`, received through [`StatsHook`]) say what it sent:
//!
//! - per topic, the size of every RecordBatch it built (`batchsize`: the 61-byte batch header
//!   plus the zstd-compressed records, i.e. what a Kafka broker stores in the partition log and
//!   serves to consumers) and the messages in it (`batchcnt`); the windows roll over at each
//!   emission, so their sums add up to totals;
//! - per broker, every byte written to the connection (`txbytes`: ProduceRequest framing, topic
//!   and partition headers, and the metadata and other requests of the period), taken as the
//!   difference between the last emission before the first record and the one after the last
//!   acknowledgement. TCP/IP headers are not included in either.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use flowlog_record::{avro, record::FlowRecord};
use flowlog_sidecar::{
    kafka::{KafkaSettings, KafkaSink, Partitioning, StatsHook},
    sink::RecordSink,
};
use rdkafka::statistics::Statistics;

use flowlog_testkit::Topic;

/// The agent's drain interval: it hands the sink what it captured once per interval, so a paced
/// condition writes a rate × 100 ms chunk per tick.
const TICK: Duration = Duration::from_millis(100);
/// Records per write when unpaced (what one drain of a busy ring buffer gives, about).
const UNPACED_CHUNK: usize = 4096;
const STATS_INTERVAL_MS: &str = "250";

/// One measured condition.
#[derive(Debug, Clone)]
pub struct Condition {
    pub label: String,
    /// Records per second handed to the sink; `None`: as fast as it takes them.
    pub rate: Option<f64>,
    pub partitions: i32,
    /// librdkafka options on top of the agent's defaults.
    pub options: Vec<(String, String)>,
    /// How the sink spreads records over the partitions (`--kafka-partitioning`).
    pub partitioning: Partitioning,
}

#[derive(Debug, Clone, Default)]
pub struct WireResult {
    pub records: u64,
    pub elapsed: Duration,
    /// Key + value bytes before compression.
    pub raw_bytes: u64,
    pub batches: u64,
    /// Messages in those batches (equals `records` unless batches were retried).
    pub batch_messages: u64,
    pub batch_bytes: u64,
    pub tx_bytes: u64,
    pub requests: u64,
    /// CPU time of this process (all threads) from the first record to the last
    /// acknowledgement: the sink, librdkafka, and the statistics it emits for the measurement.
    pub cpu: Duration,
}

impl WireResult {
    pub fn per_record(&self, bytes: u64) -> f64 {
        bytes as f64 / self.records as f64
    }
}

#[derive(Debug, Default)]
struct Totals {
    emissions: u64,
    batch_bytes: i64,
    batch_messages: i64,
    batches: i64,
    /// Latest cumulative counters per broker entry (bootstrap and real ones).
    tx_bytes: HashMap<String, u64>,
    tx_requests: HashMap<String, u64>,
}

impl Totals {
    fn add(&mut self, topic: &str, s: &Statistics) {
        self.emissions += 1;
        if let Some(t) = s.topics.get(topic) {
            self.batch_bytes += t.batchsize.sum;
            self.batch_messages += t.batchcnt.sum;
            self.batches += t.batchcnt.cnt;
        }
        for (name, b) in &s.brokers {
            self.tx_bytes.insert(name.clone(), b.txbytes);
            self.tx_requests.insert(name.clone(), b.tx);
        }
    }

    fn tx(&self) -> (u64, u64) {
        (
            self.tx_bytes.values().sum(),
            self.tx_requests.values().sum(),
        )
    }
}

/// Produces `records` through a fresh [`KafkaSink`] under `condition` and measures the bytes.
pub fn measure(
    brokers: &str,
    records: &[FlowRecord],
    condition: &Condition,
    work_dir: &Path,
) -> anyhow::Result<WireResult> {
    let topic = Topic::create_on(brokers, "bench-wire", condition.partitions);
    let totals = Arc::new(Mutex::new(Totals::default()));
    let mut settings = KafkaSettings::new(brokers, &topic.name);
    settings.spool_dir = work_dir.join(format!("spool-{}", topic.name));
    settings.options = vec![(
        "statistics.interval.ms".to_string(),
        STATS_INTERVAL_MS.to_string(),
    )];
    settings.options.extend(condition.options.iter().cloned());
    settings.partitioning = condition.partitioning;
    let hook_totals = Arc::clone(&totals);
    let hook_topic = topic.name.clone();
    settings.stats = Some(StatsHook(Arc::new(move |s: &Statistics| {
        hook_totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(&hook_topic, s);
    })));
    let spool_dir = settings.spool_dir.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let mut sink = KafkaSink::connect(settings).context("starting the Kafka sink")?;
        // A first emission after the connection: its counters are the baseline.
        let (tx0, req0) = wait_for(&totals, |t| t.emissions >= 2, Duration::from_secs(10))
            .await
            .context("no librdkafka statistics")?;
        let start = Instant::now();
        let cpu0 = crate::throughput::cpu_time(libc::RUSAGE_SELF);
        match condition.rate {
            Some(rate) => {
                let mut written = 0usize;
                let mut tick = tokio::time::interval(TICK);
                while written < records.len() {
                    tick.tick().await;
                    let due = ((start.elapsed().as_secs_f64() * rate) as usize)
                        .clamp(written, records.len());
                    if due > written {
                        sink.write(&records[written..due]).await?;
                        sink.flush().await?;
                        written = due;
                    } else {
                        sink.idle().await?;
                    }
                }
            }
            None => {
                for chunk in records.chunks(UNPACED_CHUNK) {
                    sink.write(chunk).await?;
                    sink.flush().await?;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while sink.spool().len_records() > 0 || sink.in_flight() > 0 {
            if Instant::now() > deadline {
                bail!(
                    "{} records not acknowledged after 120 s",
                    sink.spool().len_records()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            sink.idle().await?;
        }
        let elapsed = start.elapsed();
        let cpu = crate::throughput::cpu_time(libc::RUSAGE_SELF) - cpu0;
        let n = records.len() as i64;
        let (tx1, req1) = wait_for(&totals, |t| t.batch_messages >= n, Duration::from_secs(10))
            .await
            .context("the statistics never counted every record in a batch")?;
        // One more emission, so that requests still on the way are counted too.
        let seen = totals.lock().unwrap_or_else(|e| e.into_inner()).emissions;
        let (tx1, req1) = wait_for(&totals, |t| t.emissions > seen, Duration::from_secs(5))
            .await
            .unwrap_or((tx1, req1));
        sink.close().await?;
        let t = totals.lock().unwrap_or_else(|e| e.into_inner());
        let mut raw_bytes = 0u64;
        let mut buf = Vec::with_capacity(256);
        for r in records {
            buf.clear();
            avro::key_into(r, &mut buf);
            avro::encode(r, avro::DEFAULT_SCHEMA_ID, &mut buf);
            raw_bytes += buf.len() as u64;
        }
        Ok(WireResult {
            records: records.len() as u64,
            elapsed,
            raw_bytes,
            batches: t.batches as u64,
            batch_messages: t.batch_messages as u64,
            batch_bytes: t.batch_bytes as u64,
            tx_bytes: tx1 - tx0,
            requests: req1 - req0,
            cpu,
        })
    });
    let _ = std::fs::remove_dir_all(spool_dir);
    result
}

/// Waits until `ready` holds for the totals; returns the brokers' (bytes, requests) then.
async fn wait_for(
    totals: &Mutex<Totals>,
    ready: impl Fn(&Totals) -> bool,
    within: Duration,
) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + within;
    loop {
        {
            let t = totals.lock().unwrap_or_else(|e| e.into_inner());
            if ready(&t) {
                return Ok(t.tx());
            }
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
