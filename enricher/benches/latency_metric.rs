//! What the end → acknowledged latency metric costs per flow (`cargo bench -p flowlog-enricher
//! --bench latency_metric`; a plain harness): the pipeline's delivery reports record one sample
//! per flow. Two ways, over the same 1M samples in batches of 1,024 (the pipeline's batch):
//! - `recorder`: a `metrics` histogram of `metrics-exporter-prometheus` (what the pipeline did
//!   before: a timestamped atomic push per sample, sorted into buckets at the exporter's
//!   upkeep, which runs here every 100 batches, about every 5 s at 20k flows/s);
//! - `tally`: [`flowlog_cli::histogram`], counted into buckets locally and added once per batch
//!   (what it does now).
//!
//! `latency_metric --bench recorder|tally|none` runs one of them (or only the setup), for
//! instruction counts under `valgrind --tool=callgrind`; without a way named it runs both and
//! prints their time per sample, and checks both pages say the same counts.
use std::time::Instant;

use flowlog_cli::histogram::FixedHistogram;
use flowlog_enricher::metrics::{LATENCY, TIME_BUCKETS};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

const BATCH: usize = 1024;

/// Latencies between 0.1 s and 2.1 s, deterministic (xorshift64*).
fn samples(n: usize) -> Vec<f64> {
    let mut x = 0x1234_5678_9abc_def1u64;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            0.1 + (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % 2_000_000) as f64 / 1e6
        })
        .collect()
}

#[inline(never)]
fn through_recorder(samples: &[f64]) -> PrometheusHandle {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(LATENCY.to_string()), TIME_BUCKETS)
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    let h = metrics::with_local_recorder(&recorder, || metrics::histogram!(LATENCY));
    for (i, batch) in samples.chunks(BATCH).enumerate() {
        for v in batch {
            h.record(*v);
        }
        if i % 100 == 99 {
            handle.run_upkeep();
        }
    }
    handle.run_upkeep();
    handle
}

#[inline(never)]
fn through_tally(samples: &[f64]) -> FixedHistogram {
    let h = FixedHistogram::new(LATENCY, TIME_BUCKETS);
    let mut tally = h.tally();
    for batch in samples.chunks(BATCH) {
        for v in batch {
            tally.record(*v);
        }
        h.add(&mut tally);
    }
    h
}

fn count_lines(page: &str) -> Vec<&str> {
    page.lines()
        .filter(|l| l.starts_with(LATENCY) && !l.contains("_sum"))
        .collect()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n = if bench { 1_000_000 } else { 10_000 };
    let samples = samples(n);
    let way = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    match way.as_deref() {
        Some("recorder") => drop(through_recorder(&samples)),
        Some("tally") => drop(through_tally(&samples)),
        Some("none") => {}
        Some(other) => panic!("unknown way {other}: recorder, tally or none"),
        None => {
            let t = Instant::now();
            let handle = through_recorder(&samples);
            let recorder_ns = t.elapsed().as_nanos() as f64 / n as f64;
            let t = Instant::now();
            let ours = through_tally(&samples);
            let tally_ns = t.elapsed().as_nanos() as f64 / n as f64;
            let theirs = handle.render();
            let mut page = String::new();
            ours.render(&mut page);
            assert_eq!(count_lines(&page), count_lines(&theirs), "same counts");
            println!(
                "{n} latency samples: recorder {recorder_ns:.1} ns a sample, tally {tally_ns:.1} ns a sample"
            );
        }
    }
}
