//! The live summary the embedded mode prints every few seconds on stdout: flows per second, the
//! top talkers by bytes, and the failed and reset connections of the last interval, each end
//! named by its attributed identity where there is one.
use std::{
    collections::HashMap,
    io::Write,
    time::{Duration, Instant},
};

use flowlog_record::{Attribution, Endpoint, EnrichedFlow, Outcome};

/// Talkers and failures listed per interval.
const TOP: usize = 5;

/// Counts of one interval.
#[derive(Default)]
struct Window {
    /// Flows that ended (records other than `open`).
    ended: u64,
    failed: u64,
    reset: u64,
    /// Payload bytes both ways per (local, remote) pair.
    talkers: HashMap<(String, String), u64>,
    /// Failed or reset flows per (local, remote, outcome).
    troubles: HashMap<(String, String, &'static str), u64>,
}

/// Accumulates enriched flows and prints a summary when its interval has passed.
pub struct Summary {
    every: Duration,
    last: Instant,
    window: Window,
    out: Box<dyn Write + Send>,
}

/// How an end is named: the identity (with its kind) when exact, else the address.
fn name(end: &Endpoint, addr: std::net::IpAddr, port: Option<u16>) -> String {
    let addr = match port {
        Some(p) => std::net::SocketAddr::new(addr, p).to_string(),
        None => addr.to_string(),
    };
    match (&end.status, &end.identity) {
        (Attribution::Exact, Some(id)) => {
            format!("{addr} ({} {})", id.kind.as_str(), id.display_name())
        }
        (Attribution::Ambiguous, _) => format!("{addr} (ambiguous)"),
        _ => addr,
    }
}

/// `12.3 MB`-style byte counts.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl Summary {
    /// Prints to `out` every `every`.
    pub fn new(every: Duration, out: Box<dyn Write + Send>) -> Self {
        Self {
            every,
            last: Instant::now(),
            window: Window::default(),
            out,
        }
    }

    /// Counts one enriched flow record.
    pub fn observe(&mut self, e: &EnrichedFlow) {
        let f = &e.flow;
        let local = match (&f.comm, f.pid) {
            (Some(comm), Some(pid)) => {
                format!("{comm}[{pid}] {}", name(&e.local, f.local_addr, None))
            }
            _ => name(&e.local, f.local_addr, None),
        };
        let remote = name(&e.remote, f.remote_addr, Some(f.remote_port));
        let w = &mut self.window;
        let trouble = match f.outcome {
            Outcome::Open => None,
            Outcome::Closed => {
                w.ended += 1;
                None
            }
            Outcome::Failed => {
                w.ended += 1;
                w.failed += 1;
                Some("failed")
            }
            Outcome::Reset => {
                w.ended += 1;
                w.reset += 1;
                Some("reset")
            }
        };
        if let Some(what) = trouble {
            *w.troubles
                .entry((local.clone(), remote.clone(), what))
                .or_default() += 1;
        }
        let moved = f.bytes_sent + f.bytes_received;
        if moved > 0 {
            *w.talkers.entry((local, remote)).or_default() += moved;
        }
    }

    /// Prints the summary if its interval has passed. `rows` is what Parquet holds durably,
    /// `held` the flows waiting for the inventory.
    pub fn tick(&mut self, rows: u64, held: usize) {
        let elapsed = self.last.elapsed();
        if elapsed < self.every {
            return;
        }
        self.print(elapsed, rows, held);
    }

    /// The last summary, at shutdown.
    pub fn finish(&mut self, rows: u64) {
        let elapsed = self.last.elapsed();
        self.print(elapsed, rows, 0);
    }

    fn print(&mut self, elapsed: Duration, rows: u64, held: usize) {
        let w = std::mem::take(&mut self.window);
        self.last = Instant::now();
        let secs = elapsed.as_secs_f64().max(0.001);
        let mut text = format!(
            "{:.1} flows/s · {} flows ended in {:.0} s ({} failed, {} reset) · {} held · {} rows in closed Parquet files\n",
            w.ended as f64 / secs,
            w.ended,
            secs,
            w.failed,
            w.reset,
            held,
            rows
        );
        let mut talkers: Vec<_> = w.talkers.into_iter().collect();
        talkers.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if !talkers.is_empty() {
            text.push_str("  top talkers (payload bytes both ways):\n");
        }
        for ((local, remote), n) in talkers.into_iter().take(TOP) {
            text.push_str(&format!("    {:>9}  {local} → {remote}\n", bytes(n)));
        }
        let mut troubles: Vec<_> = w.troubles.into_iter().collect();
        troubles.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if !troubles.is_empty() {
            text.push_str("  failures and resets:\n");
        }
        for ((local, remote, what), n) in troubles.into_iter().take(TOP) {
            text.push_str(&format!("    {n:>6} {what:<6}  {local} → {remote}\n"));
        }
        // A closed stdout (piped into `head`) must not stop capture.
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(12_345), "12.3 kB");
        assert_eq!(bytes(5_000_000), "5.0 MB");
    }
}
