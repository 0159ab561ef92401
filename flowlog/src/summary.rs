//! The live summary the embedded mode prints every few seconds on stdout: flows per second, the
//! top talkers by bytes, and the failed and reset connections of the last interval.
//!
//! It speaks in connections, as a user thinks of them: each is shown once, as
//! `client → server:port`, whichever end this host saw. A connection between two processes of
//! this host has two records (the client's outbound one and the server's inbound one); they are
//! matched by their 4-tuple and counted once, from the client's record. A client is named
//! without its ephemeral port (its process, identity or address), so many connections of one
//! client to one service add up to one line: the top talkers are services, not ports.
use std::{
    collections::HashMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use flowlog_record::{Attribution, Direction, Endpoint, EnrichedFlow, FlowRecord, Outcome};

/// Talkers and failures listed per interval.
const TOP: usize = 5;

/// One TCP connection: the client's and the server's socket address.
type Connection = (SocketAddr, SocketAddr);

/// What one side's records of a connection said in the interval.
struct Side {
    /// `(client, server:port)` as this side names them: its own end with its process.
    names: (String, String),
    /// Payload bytes both ways.
    bytes: u64,
    /// How it ended, if it did badly.
    trouble: Option<&'static str>,
}

/// A connection's records of the interval: the client's side and the server's side, as seen.
#[derive(Default)]
struct Sides {
    client: Option<Side>,
    server: Option<Side>,
}

impl Sides {
    /// The connection's bytes and trouble, once (the client's record where this host has it),
    /// and its names: each end as its own side names it (with its process), where seen.
    fn counted(self) -> Option<((String, String), u64, Option<&'static str>)> {
        let (counted, other) = match (self.client, self.server) {
            (Some(c), s) => (c, s),
            (None, Some(s)) => (s, None),
            (None, None) => return None,
        };
        let server = match other {
            Some(s) => s.names.1,
            None => counted.names.1,
        };
        Some(((counted.names.0, server), counted.bytes, counted.trouble))
    }
}

/// Counts of one interval.
#[derive(Default)]
struct Window {
    /// Flows that ended (records other than `open`).
    ended: u64,
    failed: u64,
    reset: u64,
    connections: HashMap<Connection, Sides>,
}

/// Accumulates enriched flows and prints a summary when its interval has passed.
pub struct Summary {
    every: Duration,
    last: Instant,
    window: Window,
    out: Box<dyn Write + Send>,
}

/// How an end is named: the address (with the port, if given), and the identity with its kind
/// when exact.
fn name(end: &Endpoint, addr: IpAddr, port: Option<u16>) -> String {
    let addr = match port {
        Some(p) => SocketAddr::new(addr, p).to_string(),
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

/// The local end's name, after its process when the record knows it (`curl 10.0.0.5 (pod …)`).
fn local_name(f: &FlowRecord, end: &Endpoint, port: Option<u16>) -> String {
    let end = name(end, f.local_addr, port);
    match &f.comm {
        Some(comm) => format!("{comm} {end}"),
        None => end,
    }
}

/// The connection of a record, and whether this host's end is the client.
fn connection(f: &FlowRecord) -> (Connection, bool) {
    let local = SocketAddr::new(f.local_addr, f.local_port);
    let remote = SocketAddr::new(f.remote_addr, f.remote_port);
    match f.direction {
        Direction::Inbound => ((remote, local), false),
        _ => ((local, remote), true),
    }
}

/// A record's `(client, server:port)` names, as its side gives them (its own end with its
/// process).
fn names(e: &EnrichedFlow, client: bool) -> (String, String) {
    let f = &e.flow;
    if client {
        (
            local_name(f, &e.local, None),
            name(&e.remote, f.remote_addr, Some(f.remote_port)),
        )
    } else {
        (
            name(&e.remote, f.remote_addr, None),
            local_name(f, &e.local, Some(f.local_port)),
        )
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
        let (key, client) = connection(f);
        let sides = w.connections.entry(key).or_default();
        let side = if client {
            &mut sides.client
        } else {
            &mut sides.server
        };
        // Named once per connection and side, not per record (interim records repeat them).
        let side = side.get_or_insert_with(|| Side {
            names: names(e, client),
            bytes: 0,
            trouble: None,
        });
        side.bytes += f.bytes_sent + f.bytes_received;
        side.trouble = side.trouble.or(trouble);
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
        let mut talkers: HashMap<(String, String), u64> = HashMap::new();
        let mut troubles: HashMap<(String, String, &'static str), u64> = HashMap::new();
        for ((client, server), moved, trouble) in
            w.connections.into_values().filter_map(Sides::counted)
        {
            if let Some(what) = trouble {
                *troubles
                    .entry((client.clone(), server.clone(), what))
                    .or_default() += 1;
            }
            if moved > 0 {
                *talkers.entry((client, server)).or_default() += moved;
            }
        }
        let mut talkers: Vec<_> = talkers.into_iter().collect();
        talkers.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if !talkers.is_empty() {
            text.push_str("  top talkers, client → server:port (payload bytes both ways):\n");
        }
        for ((client, server), n) in talkers.into_iter().take(TOP) {
            text.push_str(&format!("    {:>9}  {client} → {server}\n", bytes(n)));
        }
        let mut troubles: Vec<_> = troubles.into_iter().collect();
        troubles.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if !troubles.is_empty() {
            text.push_str("  failed and reset connections, client → server:port:\n");
        }
        for ((client, server, what), n) in troubles.into_iter().take(TOP) {
            text.push_str(&format!("    {n:>6} {what:<6}  {client} → {server}\n"));
        }
        // A closed stdout (piped into `head`) must not stop capture.
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use flowlog_record::{Identity, IdentityKind};

    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A record of this host's end `local` talking to `remote`.
    fn flow(
        direction: Direction,
        outcome: Outcome,
        local: &str,
        remote: &str,
        comm: &str,
        bytes: (u64, u64),
    ) -> EnrichedFlow {
        let (local, remote): (SocketAddr, SocketAddr) =
            (local.parse().unwrap(), remote.parse().unwrap());
        EnrichedFlow {
            flow: FlowRecord {
                flow_id: 1,
                host: "h".into(),
                start_ns: 1,
                end_ns: 2,
                local_addr: local.ip(),
                local_port: local.port(),
                remote_addr: remote.ip(),
                remote_port: remote.port(),
                direction,
                outcome,
                bytes_sent: bytes.0,
                bytes_received: bytes.1,
                pid: Some(7),
                comm: Some(comm.into()),
                ..FlowRecord::default()
            },
            local: Endpoint::unknown(),
            remote: Endpoint::unknown(),
            enriched_ns: 3,
        }
    }

    fn printed(flows: &[EnrichedFlow]) -> String {
        let out = Captured::default();
        let mut summary = Summary::new(Duration::from_secs(5), Box::new(out.clone()));
        for f in flows {
            summary.observe(f);
        }
        summary.finish(0);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        // The first line has the interval's rate: everything after it is exact.
        text.split_once('\n').unwrap().1.to_owned()
    }

    /// Fifty loopback connections of one client process to one server: each has a client and a
    /// server record, counted once, and the clients' ephemeral ports add up to one line named
    /// by both processes.
    #[test]
    fn a_service_is_one_talker_however_many_connections_and_ports() {
        let mut flows = Vec::new();
        for port in 40_001..=40_050 {
            let client = format!("127.0.0.1:{port}");
            flows.push(flow(
                Direction::Outbound,
                Outcome::Closed,
                &client,
                "127.0.0.1:8080",
                "curl",
                (100, 1_000),
            ));
            flows.push(flow(
                Direction::Inbound,
                Outcome::Closed,
                "127.0.0.1:8080",
                &client,
                "nginx",
                (1_000, 100),
            ));
        }
        assert_eq!(
            printed(&flows),
            "  top talkers, client → server:port (payload bytes both ways):\n\
             \x20     55.0 kB  curl 127.0.0.1 → nginx 127.0.0.1:8080\n"
        );
    }

    /// Seen from one end only: an inbound connection from an attributed client names the client
    /// by its identity without its port; a failed connect and a reset are listed once each, as
    /// client → server:port.
    #[test]
    fn one_sided_connections_and_failures_read_client_to_server() {
        let mut inbound = flow(
            Direction::Inbound,
            Outcome::Reset,
            "10.0.0.1:443",
            "10.0.0.9:5555",
            "nginx",
            (2_000, 300),
        );
        inbound.remote = Endpoint::exact(Arc::new(Identity {
            kind: IdentityKind::Pod,
            name: "web-1".into(),
            namespace: Some("shop".into()),
            ..Identity::default()
        }));
        let failed = flow(
            Direction::Outbound,
            Outcome::Failed,
            "10.0.0.1:41000",
            "10.0.0.7:5432",
            "psql",
            (0, 0),
        );
        assert_eq!(
            printed(&[inbound, failed]),
            "  top talkers, client → server:port (payload bytes both ways):\n\
             \x20      2.3 kB  10.0.0.9 (pod shop/web-1) → nginx 10.0.0.1:443\n\
             \x20 failed and reset connections, client → server:port:\n\
             \x20        1 reset   10.0.0.9 (pod shop/web-1) → nginx 10.0.0.1:443\n\
             \x20        1 failed  psql 10.0.0.1 → 10.0.0.7:5432\n"
        );
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(12_345), "12.3 kB");
        assert_eq!(bytes(5_000_000), "5.0 MB");
    }
}
