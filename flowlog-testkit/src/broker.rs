//! Brokers of a test's own, for tests that stop, restart or cut off their broker without
//! disturbing the shared one other tests use at the same time: [`PrivateBroker`] (a tansu started
//! by `scripts/kafka` on a port and data directory of its own) and [`PortBlock`] (nftables
//! resetting and refusing every connection to a loopback port, which leaves the broker itself
//! running — the outage a client sees when a network path or a load balancer fails).
use std::{
    net::TcpListener,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{admin, temp_dir, unique_name};

const KAFKA_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka");

/// A tansu broker of the test's own (`scripts/kafka` with its own port and data directory).
/// Stopped and removed on drop; its log's last lines are printed if the test is failing.
pub struct PrivateBroker {
    dir: PathBuf,
    /// `host:port` of the broker (its listener and advertised address).
    pub addr: String,
}

impl PrivateBroker {
    /// Starts a broker for `test` (its directory is named after it).
    pub fn start(test: &str) -> Self {
        let broker = Self {
            dir: temp_dir(&format!("tansu-{test}")),
            addr: format!("127.0.0.1:{}", static_port()),
        };
        broker.run("start");
        broker
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("addr is host:port")
    }

    /// Stops the broker (its data stays for [`PrivateBroker::restart`]).
    pub fn stop(&self) {
        self.run("stop");
    }

    /// Runs `scripts/kafka CMD DIR`; `start` must start this broker, not find another listener.
    fn run(&self, cmd: &str) {
        let out = Command::new(KAFKA_SCRIPT)
            .args([cmd, self.dir.to_str().unwrap()])
            .env("FLOWLOG_KAFKA_LISTEN", &self.addr)
            .output()
            .unwrap_or_else(|e| panic!("running {KAFKA_SCRIPT}: {e}"));
        assert!(
            out.status.success(),
            "scripts/kafka {cmd} {}: {}\n{}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            cmd != "start" || stdout.contains("tansu started"),
            "scripts/kafka start did not start a broker of ours on {}: {stdout}",
            self.addr
        );
    }

    /// Starts the stopped broker again (same data directory) and waits until it serves the
    /// topic's metadata; a broker that does not within 10 s is stopped and started again.
    pub fn restart(&self, topic: &str) {
        for _ in 0..3 {
            self.run("start");
            let client = admin(&self.addr);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let ok = client
                    .inner()
                    .fetch_metadata(Some(topic), Duration::from_secs(2))
                    .is_ok_and(|m| {
                        m.topics()
                            .iter()
                            .any(|t| t.name() == topic && t.error().is_none())
                    });
                if ok {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
            eprintln!(
                "private broker {} not healthy after restart: restarting",
                self.addr
            );
            self.run("stop");
        }
        panic!("private broker {} did not come back healthy", self.addr);
    }
}

/// A free loopback port below the kernel's ephemeral range (32768 and up by default): the
/// kernel never hands it out for `bind(0)` or a connect, so while the private broker is stopped
/// no other test's listener (an agent's metrics port) or connection can take it.
fn static_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 5_000) as u16 * 2;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(port < 32_000, "no free static port");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "private broker {} log (last lines, newest first):",
                self.addr
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
        self.run("stop");
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Every TCP connection to `127.0.0.1:port` reset, and every new one refused, while this value
/// lives: an nftables table of its own (named after the test) with a rule on the output hook,
/// which loopback traffic of both directions passes. The resets the rules send pass the same
/// hook, so the rules leave RST segments alone: a rule that rejected them too would turn the
/// outage into a black hole that clients only notice at their socket timeouts. Needs root and
/// `nft`. Removed on drop.
pub struct PortBlock {
    table: String,
}

impl PortBlock {
    /// Starts the outage of `port`.
    pub fn start(port: u16) -> Self {
        let table = unique_name("block").replace('-', "_");
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} out {{ type filter hook output priority 0; policy accept; }}\n\
             add rule inet {table} out ip daddr 127.0.0.1 tcp dport {port} tcp flags & rst == 0 reject with tcp reset\n\
             add rule inet {table} out ip saddr 127.0.0.1 tcp sport {port} tcp flags & rst == 0 reject with tcp reset\n"
        );
        nft(&script);
        Self { table }
    }
}

impl Drop for PortBlock {
    fn drop(&mut self) {
        nft(&format!("delete table inet {}\n", self.table));
    }
}

fn nft(script: &str) {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("running nft (scripts/bootstrap installs nftables)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "nft -f - failed ({status}) on:\n{script}");
}
