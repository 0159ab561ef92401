//! Records per second and CPU per record: the codec alone (key + Confluent-framed Avro into
//! reused buffers, on one thread, CPU time of that thread), and encode + produce through the
//! agent's [`KafkaSink`] (spool write-ahead, librdkafka, delivery reports, acknowledgements)
//! against a baseline in the same run: a plain rdkafka `ThreadedProducer` with the very same
//! configuration ([`client_config`]) sending the same records pre-encoded (encoding not timed),
//! no spool. Both wait until the broker acknowledged every record; CPU is the whole process's
//! (`getrusage`, all threads: ours and librdkafka's), the broker's own CPU is not counted.
use std::{
    hint::black_box,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use flowlog_record::{avro, record::FlowRecord};
use flowlog_sidecar::{
    kafka::{KafkaSettings, KafkaSink, client_config},
    sink::RecordSink,
};
use rdkafka::{
    ClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer},
};

use flowlog_testkit::Topic;

/// Records per `write` for the sink (one busy drain of the ring buffer, about).
const CHUNK: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub records: u64,
    pub wall: Duration,
    pub cpu: Duration,
}

impl Run {
    pub fn per_second(&self) -> f64 {
        self.records as f64 / self.wall.as_secs_f64()
    }
    pub fn per_cpu_second(&self) -> f64 {
        self.records as f64 / self.cpu.as_secs_f64()
    }
    pub fn cpu_ns_per_record(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.records as f64
    }
}

/// CPU time (user + system) of this process (`RUSAGE_SELF`) or thread (`RUSAGE_THREAD`).
pub fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills a struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    d(u.ru_utime) + d(u.ru_stime)
}

/// Encodes `total` records (cycling through `records`) on this thread.
pub fn encode_only(records: &[FlowRecord], total: usize) -> Run {
    let mut key = Vec::with_capacity(64);
    let mut value = Vec::with_capacity(256);
    let cpu0 = cpu_time(libc::RUSAGE_THREAD);
    let start = Instant::now();
    for r in records.iter().cycle().take(total) {
        key.clear();
        avro::key_into(r, &mut key);
        value.clear();
        avro::encode(r, avro::DEFAULT_SCHEMA_ID, &mut value);
        black_box((&key, &value));
    }
    Run {
        records: total as u64,
        wall: start.elapsed(),
        cpu: cpu_time(libc::RUSAGE_THREAD) - cpu0,
    }
}

/// Encode + produce through [`KafkaSink`] until every record is acknowledged.
pub fn through_sink(
    brokers: &str,
    records: &[FlowRecord],
    options: &[(String, String)],
    work_dir: &Path,
) -> anyhow::Result<Run> {
    let topic = Topic::create_on(brokers, "bench-sink", 3);
    let mut settings = KafkaSettings::new(brokers, &topic.name);
    settings.options = options.to_vec();
    settings.spool_dir = work_dir.join(format!("spool-{}", topic.name));
    let spool_dir = settings.spool_dir.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let run = runtime.block_on(async {
        let mut sink = KafkaSink::connect(settings).context("starting the Kafka sink")?;
        let cpu0 = cpu_time(libc::RUSAGE_SELF);
        let start = Instant::now();
        for chunk in records.chunks(CHUNK) {
            sink.write(chunk).await?;
            sink.flush().await?;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while sink.spool().len_records() > 0 || sink.in_flight() > 0 {
            if Instant::now() > deadline {
                bail!("{} records not acknowledged", sink.spool().len_records());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            sink.idle().await?;
        }
        let run = Run {
            records: records.len() as u64,
            wall: start.elapsed(),
            cpu: cpu_time(libc::RUSAGE_SELF) - cpu0,
        };
        sink.close().await?;
        Ok(run)
    });
    let _ = std::fs::remove_dir_all(spool_dir);
    run
}

/// Counts delivery reports.
struct Count {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for Count {}

impl ProducerContext for Count {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The baseline: the same configuration, the same records already encoded, a plain producer.
pub fn plain_producer(
    brokers: &str,
    encoded: &[(Vec<u8>, Vec<u8>)],
    options: &[(String, String)],
) -> anyhow::Result<Run> {
    let topic = Topic::create_on(brokers, "bench-plain", 3);
    let mut settings = KafkaSettings::new(brokers, &topic.name);
    settings.options = options.to_vec();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let producer: ThreadedProducer<Count> = client_config(&settings)
        .create_with_context(Count {
            ok: Arc::clone(&ok),
            failed: Arc::clone(&failed),
        })
        .context("creating the baseline producer")?;
    // Connected before the clock starts, like the sink (whose connect fetches metadata).
    rdkafka::producer::Producer::client(&producer)
        .fetch_metadata(Some(&topic.name), Duration::from_secs(10))
        .context("baseline producer metadata")?;
    let cpu0 = cpu_time(libc::RUSAGE_SELF);
    let start = Instant::now();
    for (key, value) in encoded {
        loop {
            let record = BaseRecord::to(&topic.name)
                .key(&key[..])
                .payload(&value[..]);
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err((e, _)) => bail!("baseline produce: {e}"),
            }
        }
    }
    let n = encoded.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "baseline: {} of {n} acknowledged",
                ok.load(Ordering::Relaxed)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let run = Run {
        records: n,
        wall: start.elapsed(),
        cpu: cpu_time(libc::RUSAGE_SELF) - cpu0,
    };
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("baseline: {failed} deliveries failed");
    }
    Ok(run)
}

/// Every record's (key, value), encoded once, for the baseline.
pub fn pre_encode(records: &[FlowRecord]) -> Vec<(Vec<u8>, Vec<u8>)> {
    records
        .iter()
        .map(|r| {
            let mut value = Vec::with_capacity(128);
            avro::encode(r, avro::DEFAULT_SCHEMA_ID, &mut value);
            (avro::key(r), value)
        })
        .collect()
}
