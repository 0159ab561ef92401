//! Prometheus histograms with fixed buckets for values recorded on a hot path, once per record.
//!
//! A `metrics` histogram handed to `metrics-exporter-prometheus` stores every sample (an atomic
//! push of the value and a timestamp) and sorts it into its buckets only when the page is
//! rendered: for the enricher's end → acknowledged latency, one sample per flow, that was 6% of
//! its main thread. What the exported histogram says is only its cumulative bucket counts, the
//! sum and the count, so [`Tally`] counts the samples of a batch into its buckets in a local
//! array and [`FixedHistogram::add`] adds that to the shared counts once per batch: the same
//! page, at a few adds per batch instead of a push per sample.
//!
//! Registered histograms ([`FixedHistogram::register`]) are rendered after the recorder's own
//! metrics by [`crate::telemetry`]'s `/metrics`, in the exporter's text format.
use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Every registered histogram, in registration order: what `/metrics` renders beside the
/// recorder's metrics. One per name for the life of the process, as in the `metrics` registry.
static REGISTERED: Mutex<Vec<Arc<FixedHistogram>>> = Mutex::new(Vec::new());

/// A histogram of `f64` samples with fixed upper bounds, rendered as a Prometheus histogram
/// (`<name>_bucket{le="…"}` cumulative, `+Inf`, `<name>_sum`, `<name>_count`).
#[derive(Debug)]
pub struct FixedHistogram {
    name: &'static str,
    bounds: &'static [f64],
    /// Samples per bucket, not cumulative: `counts[i]` ≤ `bounds[i]` and above the bound
    /// before; the last one above every bound.
    counts: Box<[AtomicU64]>,
    /// The sum of the samples, as `f64` bits.
    sum: AtomicU64,
}

impl FixedHistogram {
    /// The histogram registered as `name`, registered now with `bounds` (ascending upper
    /// bounds of the buckets) if it was not. A second registration of a name returns the first
    /// one (its bounds stay those of the first).
    pub fn register(name: &'static str, bounds: &'static [f64]) -> Arc<Self> {
        debug_assert!(bounds.is_sorted(), "bucket bounds ascend");
        let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = registered.iter().find(|h| h.name == name) {
            return h.clone();
        }
        let h = Arc::new(Self::new(name, bounds));
        registered.push(h.clone());
        h
    }

    /// A histogram that no `/metrics` renders (tests, benchmarks).
    pub fn new(name: &'static str, bounds: &'static [f64]) -> Self {
        Self {
            name,
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// An empty local tally with this histogram's buckets.
    pub fn tally(&self) -> Tally {
        Tally {
            bounds: self.bounds,
            counts: vec![0; self.bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Adds what `tally` counted (of this histogram's buckets) and empties it.
    pub fn add(&self, tally: &mut Tally) {
        debug_assert!(std::ptr::eq(tally.bounds, self.bounds), "same buckets");
        let mut any = false;
        for (shared, local) in self.counts.iter().zip(tally.counts.iter_mut()) {
            if *local > 0 {
                shared.fetch_add(*local, Ordering::Relaxed);
                *local = 0;
                any = true;
            }
        }
        if any {
            // One writer per histogram in practice (the pipeline): the loop rarely turns twice.
            let _ = self
                .sum
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                    Some((f64::from_bits(bits) + tally.sum).to_bits())
                });
        }
        tally.sum = 0.0;
    }

    /// Appends this histogram in the Prometheus text format, as `metrics-exporter-prometheus`
    /// renders a histogram with buckets.
    pub fn render(&self, out: &mut String) {
        let name = self.name;
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
        out.push('\n');
    }

    /// Appends every registered histogram (see [`FixedHistogram::render`]).
    pub fn render_registered(out: &mut String) {
        let registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
        for h in registered.iter() {
            h.render(out);
        }
    }
}

/// Samples counted into a [`FixedHistogram`]'s buckets locally, until
/// [`FixedHistogram::add`] adds them to it: no atomic operation per sample.
#[derive(Debug, Clone)]
pub struct Tally {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
}

impl Tally {
    /// Counts one sample (a Prometheus bucket holds the values ≤ its bound).
    pub fn record(&mut self, value: f64) {
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.counts[bucket] += 1;
        self.sum += value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

    /// The lines of one metric's family in a rendered page, in order.
    fn family(page: &str, name: &str) -> Vec<String> {
        page.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    /// The page says what the exporter's own histogram says for the same samples and buckets
    /// (the exporter as the reference), whether they are added at once or in several tallies.
    #[test]
    fn renders_what_the_exporter_renders_for_the_same_samples() {
        // Bounds themselves (a bucket includes its bound), values between, beyond the last.
        let samples = [
            0.0, 0.01, 0.010_001, 0.05, 0.07, 0.1, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 60.0, 61.0,
            1_000.0, 0.2, 0.2, 0.2,
        ];
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("flowlog_test_seconds".into()),
                BOUNDS,
            )
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let h = metrics::histogram!("flowlog_test_seconds");
            for v in samples {
                h.record(v);
            }
        });
        let expected = family(&handle.render(), "flowlog_test_seconds");
        assert_eq!(expected.len(), BOUNDS.len() + 3, "{expected:?}");

        let ours = FixedHistogram::new("flowlog_test_seconds", BOUNDS);
        let mut tally = ours.tally();
        for (i, v) in samples.iter().enumerate() {
            tally.record(*v);
            if i % 5 == 4 {
                ours.add(&mut tally);
            }
        }
        ours.add(&mut tally);
        // An empty tally adds nothing.
        ours.add(&mut tally);
        let mut page = String::new();
        ours.render(&mut page);
        assert!(page.starts_with("# TYPE flowlog_test_seconds histogram\n"));
        let ours = family(&page, "flowlog_test_seconds");
        // The sum is added in another order (per tally), so only its last bits may differ.
        let is_sum = |l: &String| l.starts_with("flowlog_test_seconds_sum ");
        let sum = |lines: &[String]| -> f64 {
            let line = lines.iter().find(|l| is_sum(l)).unwrap();
            line.rsplit_once(' ').unwrap().1.parse().unwrap()
        };
        assert!((sum(&ours) - sum(&expected)).abs() < 1e-9);
        assert!((sum(&ours) - samples.iter().sum::<f64>()).abs() < 1e-9);
        let without_sum = |lines: &[String]| -> Vec<String> {
            lines.iter().filter(|l| !is_sum(l)).cloned().collect()
        };
        assert_eq!(without_sum(&ours), without_sum(&expected));
        // And counted by hand: a bucket holds the values up to and including its bound.
        for line in [
            "flowlog_test_seconds_bucket{le=\"0.01\"} 2",
            "flowlog_test_seconds_bucket{le=\"0.25\"} 9",
            "flowlog_test_seconds_bucket{le=\"1\"} 13",
            "flowlog_test_seconds_bucket{le=\"60\"} 17",
            "flowlog_test_seconds_bucket{le=\"+Inf\"} 19",
            "flowlog_test_seconds_count 19",
        ] {
            assert!(ours.iter().any(|l| l == line), "{line} in {ours:?}");
        }
    }

    #[test]
    fn a_name_registers_once() {
        let a = FixedHistogram::register("flowlog_test_once_seconds", BOUNDS);
        let b = FixedHistogram::register("flowlog_test_once_seconds", &[1.0]);
        assert!(Arc::ptr_eq(&a, &b));
        let mut t = b.tally();
        t.record(0.5);
        a.add(&mut t);
        let mut page = String::new();
        FixedHistogram::render_registered(&mut page);
        assert_eq!(
            page.matches("# TYPE flowlog_test_once_seconds histogram")
                .count(),
            1
        );
        assert!(
            page.contains("flowlog_test_once_seconds_count 1\n"),
            "{page}"
        );
    }
}
