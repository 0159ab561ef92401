//! Connection end → enriched record readable, with live agents: the release `flowlog-sidecar`
//! captures a paced connect/close churn on loopback (two flows per connection, one per end)
//! and sends its records to `flows.raw` over Kafka as deployed; one `flowlog-enricher` reads
//! them and writes `flows.enriched`; a consumer here reads `flows.enriched` and, for each
//! record of the load, takes the time it was read minus the flow's `end_ns` (the kernel's
//! close, on this host's clock, which every process here shares). Read time comes after the
//! broker acknowledged the enricher's write, so this bounds "acknowledged" from above.
use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use flowlog_record::enriched_avro;
use flowlog_testkit::Topic;
use rdkafka::{
    ClientConfig, Message as _,
    consumer::{BaseConsumer, Consumer as _},
    error::KafkaError,
};

use crate::{
    attach::Attached,
    load::{self, Pace, Server},
    replica::{self, Pipeline, Replica},
};

/// One offered load's latencies.
#[derive(Debug, Clone)]
pub struct LatencyRun {
    /// Connections per second offered (two flow records each).
    pub rate: f64,
    pub connections: u64,
    /// Records of the load read from `flows.enriched`.
    pub records: u64,
    /// Records the agent reported over the run (its `/metrics`: the load's and the host's
    /// other flows).
    pub agent_records: f64,
    /// Of those, the records the broker acknowledged by the end of the run (the rest wait in
    /// the agent's spool): where this falls short of `agent_records`, the broker is the limit.
    pub agent_acked: f64,
    /// How long the run took, from the load's start to the reader's end, seconds.
    pub elapsed: f64,
    /// Sorted latencies, seconds.
    pub latencies: Vec<f64>,
    /// The enricher's own histogram (flow end → output acknowledged): share within 1 s and 2 s.
    pub acked_within_1s: f64,
    pub acked_within_2s: f64,
    /// CPU of the agent and the enricher over the load, % of one core.
    pub agent_cpu_pct: f64,
    pub enricher_cpu_pct: f64,
}

impl LatencyRun {
    pub fn quantile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[i]
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// Runs the load at `rate` connections/s for `duration`, everything fresh (topics, agent,
/// enricher), and collects the latencies.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    brokers: &str,
    sidecar: &Path,
    enricher: &Path,
    static_file: &Path,
    work_dir: &Path,
    partitions: i32,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<LatencyRun> {
    let raw = Topic::create_on(brokers, "bench-latency-raw", partitions);
    let enriched = Topic::create_on(brokers, "bench-latency-enriched", partitions);
    let dlq = Topic::create_on(brokers, "bench-latency-dlq", 1);
    let tag = format!("latency-{}", rate as u64);
    let mut replica = Replica::start(
        enricher,
        &Pipeline {
            brokers,
            input: &raw.name,
            output: &enriched.name,
            dlq: &dlq.name,
            group: format!("{}-group", raw.name),
            static_file,
            parquet: work_dir.join(format!("{tag}-parquet")),
        }
        .args(),
        None,
        &work_dir.join(format!("{tag}-enricher.log")),
    )?;
    replica.wait_ready(Duration::from_secs(60))?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{}-reader", enriched.name))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("creating the flows.enriched reader")?;
    consumer.subscribe(&[&enriched.name])?;
    let agent = Attached::sidecar_with(
        sidecar,
        work_dir,
        &tag,
        &[
            "--output".into(),
            "kafka".into(),
            "--kafka-brokers".into(),
            brokers.into(),
            "--kafka-topic".into(),
            raw.name.clone(),
            "--spool-dir".into(),
            work_dir.join(format!("{tag}-spool")).display().to_string(),
        ],
        work_dir.join(format!("{tag}.none")),
    )?;
    let server = Server::start(2, false)?;
    let ticks = crate::procfs::clock_ticks_per_second()? as f64;
    let agent_cpu0 = crate::procfs::cpu_ticks(agent.pid())?;
    let enricher_cpu0 = replica.cpu_seconds()?;
    let load_start = now_ns();
    let started = Instant::now();
    let port_of = server.ports();
    // The churn runs on its own threads; this one reads flows.enriched meanwhile.
    let (churn, latencies) = std::thread::scope(|scope| {
        let churn = scope.spawn(|| load::churn(&server, duration, Pace::Rate(rate)));
        let mut latencies = Vec::new();
        let mut quiet_since = Instant::now();
        let result = (|| -> anyhow::Result<()> {
            loop {
                match consumer.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        let read_ns = now_ns();
                        let flow = enriched_avro::decode_expecting(
                            m.payload().unwrap_or_default(),
                            enriched_avro::DEFAULT_SCHEMA_ID,
                        )
                        .context("decoding a flows.enriched record")?
                        .flow;
                        // The load's flows: either end on one of the churn's server ports.
                        let ours = port_of.contains(&flow.local_port)
                            || port_of.contains(&flow.remote_port);
                        if ours && flow.end_ns >= load_start {
                            latencies.push(read_ns.saturating_sub(flow.end_ns) as f64 / 1e9);
                        }
                        quiet_since = Instant::now();
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                    Some(Err(e)) => return Err(e).context("reading flows.enriched"),
                }
                // Done when the load is over and nothing new came for 5 s.
                if started.elapsed() > duration && quiet_since.elapsed() > Duration::from_secs(5) {
                    return Ok(());
                }
                if started.elapsed() > duration + Duration::from_secs(120) {
                    bail!("flows.enriched still flowing 120 s after the load");
                }
            }
        })();
        (churn.join(), result.map(|()| latencies))
    });
    let churn = churn.map_err(|_| anyhow::anyhow!("the churn panicked"))??;
    let mut latencies = latencies?;
    let elapsed = started.elapsed().as_secs_f64();
    let agent_cpu_pct =
        100.0 * (crate::procfs::cpu_ticks(agent.pid())? - agent_cpu0) as f64 / ticks / elapsed;
    let enricher_cpu_pct = 100.0 * (replica.cpu_seconds()? - enricher_cpu0) / elapsed;
    let agent_page = agent.scrape_metrics().ok();
    let agent_metric = |name: &str| {
        agent_page
            .as_deref()
            .map_or(f64::NAN, |page| replica::sum(page, name))
    };
    let agent_records = agent_metric("flowlog_sidecar_records_total");
    let agent_acked = agent_metric("flowlog_sidecar_kafka_records_sent_total");
    let page = replica.scrape()?;
    let bucket = |le: &str| {
        replica::sum(
            &page,
            &format!("flowlog_enricher_latency_seconds_bucket{{le=\"{le}\"}}"),
        )
    };
    let count = replica::sum(&page, "flowlog_enricher_latency_seconds_count");
    agent.stop()?;
    replica.stop()?;
    latencies.sort_by(f64::total_cmp);
    Ok(LatencyRun {
        rate,
        connections: churn.connections,
        records: latencies.len() as u64,
        agent_records,
        agent_acked,
        elapsed,
        latencies,
        acked_within_1s: bucket("1") / count,
        acked_within_2s: bucket("2") / count,
        agent_cpu_pct,
        enricher_cpu_pct,
    })
}
