//! Counting what the tracers wrote, to check that every connection of the load was recorded on
//! both ends. Only records touching the churn servers' ports count: the host's other flows (the
//! metrics scrape, other engineers' work) are ignored.
use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    path::Path,
};

use anyhow::Context as _;
use serde::Deserialize;

/// The few fields of a sidecar record the check needs.
#[derive(Deserialize)]
struct SidecarRecord {
    local_port: u16,
    remote_port: u16,
    direction: String,
    outcome: String,
}

/// Records of the load's connections found in a tracer's output.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordCount {
    /// Records of the load's flows (client side + server side).
    pub records: u64,
    /// Of those, client-side (outbound) records; the sidecar only.
    pub outbound: u64,
    /// Of those, records whose outcome is not `closed`; the sidecar only.
    pub not_closed: u64,
    /// Events the tracer itself says it lost (bpftrace's "Lost N events").
    pub lost: u64,
}

/// Counts the sidecar's JSON-lines records for flows to or from one of `ports`.
pub fn count_sidecar(path: &Path, ports: &[u16]) -> anyhow::Result<RecordCount> {
    let mut count = RecordCount::default();
    for_each_line(path, |line| {
        let record: SidecarRecord = serde_json::from_str(line)
            .with_context(|| format!("parsing a record of {}: {line}", path.display()))?;
        if ports.contains(&record.local_port) || ports.contains(&record.remote_port) {
            count.records += 1;
            count.outbound += u64::from(record.direction == "outbound");
            count.not_closed += u64::from(record.outcome != "closed");
        }
        Ok(())
    })?;
    Ok(count)
}

/// Counts bpftrace's lines (`pid saddr:sport daddr:dport tx rx us comm`) for flows to or from
/// one of `ports`, and the events it reports lost.
pub fn count_bpftrace(path: &Path, ports: &[u16]) -> anyhow::Result<RecordCount> {
    let mut count = RecordCount::default();
    let ours = |endpoint: Option<&str>| {
        endpoint
            .and_then(|e| e.rsplit_once(':'))
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_some_and(|port| ports.contains(&port))
    };
    for_each_line(path, |line| {
        if let Some(rest) = line.strip_prefix("Lost ") {
            count.lost += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            return Ok(());
        }
        let mut fields = line.split(' ').skip(1);
        let (local, remote) = (fields.next(), fields.next());
        if ours(local) || ours(remote) {
            count.records += 1;
        }
        Ok(())
    })?;
    Ok(count)
}

fn for_each_line(path: &Path, mut f: impl FnMut(&str) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for line in BufReader::with_capacity(1 << 20, file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if !line.is_empty() {
            f(&line)?;
        }
    }
    Ok(())
}

/// Sums `flowlog_sidecar_kernel_drops_total` over its labels in a Prometheus text page, and
/// lists each labelled value. `None` if the page has no such series yet.
pub fn kernel_drops(metrics: &str) -> Option<(u64, String)> {
    const NAME: &str = "flowlog_sidecar_kernel_drops_total";
    let mut total = 0u64;
    let mut parts = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(NAME) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let (labels, value) = rest.rsplit_once(' ')?;
        let value: f64 = value.parse().ok()?;
        total += value as u64;
        let reason = labels
            .split("reason=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("all");
        parts.push(format!("{reason}={value}"));
    }
    (!parts.is_empty()).then(|| (total, parts.join(" ")))
}
