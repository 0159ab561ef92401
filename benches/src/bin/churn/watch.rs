//! Noticing when the machine is not ours alone. This VM is shared with other work (builds, the
//! sidecar's own integration tests, which attach their own flowlog programs to the same
//! tracepoints and so tax every connection of our load). The harness waits for such load to go
//! away before each trial and flags trials that overlapped it, so that medians can leave them
//! out.
use std::{
    collections::BTreeSet,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::procfs::{self, HostCpu};

/// CPU used by other processes above which a trial does not count as clean, in percent of the
/// whole machine.
pub const OTHERS_LIMIT_PCT: f64 = 5.0;
/// How often the watcher looks for other tracers during a trial.
const SCAN_EVERY: Duration = Duration::from_millis(500);

/// What else ran on the machine during an interval.
#[derive(Debug, Clone, Default)]
pub struct Interference {
    /// Other processes holding tracing BPF programs, as "pid (comm)".
    pub tracers: BTreeSet<String>,
    /// CPU charged to tasks other than this harness and its tracer, in percent of the machine.
    pub others_pct: f64,
}

impl Interference {
    pub fn is_clean(&self) -> bool {
        self.tracers.is_empty() && self.others_pct <= OTHERS_LIMIT_PCT
    }

    /// A short note for the report, empty when clean.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.others_pct > OTHERS_LIMIT_PCT {
            parts.push(format!("other processes used {:.0}% CPU", self.others_pct));
        }
        if !self.tracers.is_empty() {
            let list: Vec<&str> = self.tracers.iter().map(String::as_str).collect();
            parts.push(format!("other tracers attached: {}", list.join(", ")));
        }
        parts.join("; ")
    }
}

/// Runs `work` while watching for other tracers; returns its result, the machine's CPU time
/// over it, and what else ran. `ours` is our tracer's pid (its CPU and programs are expected).
pub fn watched<T>(
    ours: Option<u32>,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, HostCpu, Interference)> {
    let me = std::process::id();
    let host_before = HostCpu::read()?;
    let me_before = procfs::cpu_ticks(me)?;
    let ours_before = ours.map(procfs::cpu_ticks).transpose()?.unwrap_or(0);
    let seen = Mutex::new(BTreeSet::new());
    let done = AtomicBool::new(false);
    let result = thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let found = procfs::foreign_tracers(ours);
                seen.lock().expect("watcher lock").extend(found);
                thread::sleep(SCAN_EVERY);
            }
        });
        let result = work();
        done.store(true, Ordering::Relaxed);
        result
    })?;
    let host = HostCpu::read()?.since(host_before);
    let me_used = procfs::cpu_ticks(me)?.saturating_sub(me_before);
    let ours_used = ours
        .map(procfs::cpu_ticks)
        .transpose()?
        .map_or(0, |t| t.saturating_sub(ours_before));
    let others = host.task.saturating_sub(me_used + ours_used);
    let interference = Interference {
        tracers: seen.into_inner().expect("watcher lock"),
        others_pct: host.pct(others),
    };
    Ok((result, host, interference))
}

/// Waits, up to `timeout`, for a quiet second: no other tracer attached and other processes
/// under [`OTHERS_LIMIT_PCT`]. Returns what was still there if it gave up (the trial then runs
/// anyway and is flagged by [`watched`]).
pub fn wait_until_quiet(timeout: Duration) -> anyhow::Result<Option<Interference>> {
    let start = Instant::now();
    let mut said = false;
    loop {
        let ((), _, seen) = watched(None, || {
            thread::sleep(Duration::from_secs(1));
            Ok(())
        })?;
        if seen.is_clean() {
            return Ok(None);
        }
        if start.elapsed() >= timeout {
            return Ok(Some(seen));
        }
        if !said {
            eprintln!(
                "[churn] waiting for other work to finish: {}",
                seen.describe()
            );
            said = true;
        }
    }
}
