//! Exactness, field by field: the agent's end record of each socket against the kernel's own
//! `TCP_INFO` of that socket, and its times against what the test observed (issue 13).
//!
//! Needs root (eBPF, network namespaces) and `ip`. Real TCP between two namespaces joined by a
//! veth pair; the agent attached to the host's tracepoints as in production. Each connection
//! makes a few request/response exchanges of random sizes; in half of them each side sometimes
//! waits 60 ms before it sends, so that the peer's delayed ACK (40 ms or more) lands in the RTT
//! samples and `srtt_us` is milliseconds, not a veth's tens of microseconds: a record carrying
//! the wrong field, or the wrong scale, cannot pass by chance. (`tc netem` would add real delay,
//! but this kernel has no netem.)
//!
//! # What is compared, and why the tolerances are what they are
//!
//! Every socket (both ends of every connection) is read twice with `getsockopt(TCP_INFO)`:
//!
//! 1. **At its last moment, exactly.** Each side closes with `shutdown(SHUT_WR)` and keeps its
//!    descriptor open until the kernel has moved the socket to `TCP_CLOSE` (the closer when the
//!    peer's FIN arrives: `tcp_fin` acknowledges it, then `tcp_time_wait` → `tcp_done`; the peer
//!    when that last ACK arrives: `LAST_ACK` → `tcp_done`). The state-change tracepoint fires in
//!    `tcp_set_state(TCP_CLOSE)`, after the segment's `segs_in`, its RTT sample and the final
//!    ACK's `segs_out` were counted, and a socket in `TCP_CLOSE` is unhashed: nothing reaches it
//!    afterwards, and close() of a closed socket changes no state. So `TCP_INFO` read in
//!    `TCP_CLOSE` holds the very values the programs read, and `srtt_us` (`tcpi_rtt`, which is
//!    `srtt_us >> 3` as the program computes it), `min_rtt_us` (`tcpi_min_rtt`), `segs_sent`
//!    (`tcpi_segs_out`), `segs_received` (`tcpi_segs_in`) and `retransmits`
//!    (`tcpi_total_retrans`) must be **equal**. Payload bytes are exact too: what the test wrote
//!    and read, and `tcpi_bytes_acked` − SYN (client) − FIN, `tcpi_bytes_received` − peer's FIN.
//!
//! 2. **Just before the close, within argued bounds.** After the last exchange both sides wait
//!    until everything they sent is acknowledged (so no data, delayed ACK or retransmission timer
//!    is pending) and meet at a barrier; each reads `TCP_INFO` (`pre`) and meets the other again,
//!    then one of them (the closer) shuts down first. From `pre` to the record the kernel can only
//!    do the FIN exchange:
//!    - closer: sends its FIN and the ACK of the peer's FIN: `segs_sent − pre = 2` (+ any
//!      retransmission, `retransmits − pre`); receives the peer's FIN, with its ACK of our FIN
//!      piggybacked or, if the peer's delayed-ACK timer fired before its application shut down,
//!      before it: `segs_received − pre ∈ [1, 2]` (+ the peer's retransmissions).
//!    - peer: receives the closer's FIN and final ACK: `segs_received − pre = 2` (+ the closer's
//!      retransmissions); sends its FIN, maybe preceded by that separate ACK: `segs_sent − pre ∈
//!      [1, 2]` (+ its own).
//!    - RTT: each side gets at most one new sample, the ACK that covers its own FIN (a FIN from
//!      the peer acknowledges no new data of ours, and no data is outstanding). The kernel's
//!      estimator does `srtt8 += m − srtt8/8` (`tcp_rtt_estimator`, `srtt8` = 8 × srtt) with a
//!      sample `m` between 0 and the time from the side's shutdown() to its seeing `TCP_CLOSE`
//!      (`M`, measured by the test). With `p = pre.tcpi_rtt` (`srtt8 ∈ [8p, 8p + 7]`) the record's
//!      `srtt_us` is `p` (no sample) or in `[⌊7p/8⌋, ⌊(7p + 7 + M)/8⌋]`. `min_rtt_us` is a
//!      windowed minimum (300 s window, longer than the test): `pre.tcpi_min_rtt` or a new
//!      sample below it, so at most `min(pre, M)` if it changed.
//!
//! Times: the programs stamp `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`) and the agent adds the
//! realtime − monotonic offset, measured as the middle of the narrowest of a few bracketed
//! reads (`flows::Clock`). The two clocks run at the same rate (NTP slews both), so the
//! conversion is off by at most half a bracket (nanoseconds) unless the realtime clock is
//! stepped during the test; [`CLOCK_SLACK`] allows a millisecond. The test reads the realtime
//! clock around each event:
//! - outbound `start_ns` (SYN sent) is within the client's connect() call;
//! - inbound `start_ns` (child socket created on the handshake's last ACK) is after the client's
//!   connect() began and before the server's accept() returned;
//! - `end_ns` (`TCP_CLOSE`) of either side is after the second shutdown() began (the closer's
//!   close needs the peer's FIN, the peer's needs the ACK of its FIN) and before that side saw
//!   `TCP_CLOSE` in `TCP_INFO` (polled every 200 µs).
//!
//! The read path must be the one this kernel allows (`tp_btf`, see `expected_read_path`): the
//! test reads the agent's `flowlog_sidecar_read_path` gauge, so a silent fallback to probe reads
//! fails it. The same comparison runs with `--probe-reads`, the fallback's path.
//!
//! Sizes are random; the seed is printed, and `FLOWLOG_TEST_SEED=<seed>` replays it.
mod support;

use std::{
    io::Write,
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use flowlog_sidecar::record::{Direction, Family, FlowRecord, Outcome};
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::*;

/// No interim record for the length of the test: every flow gets exactly its end record.
const NO_INTERIM: &str = "1h";

/// How far the agent's times may be from the test's observations: its conversion of kernel
/// (monotonic) times to epoch time is off by half of a bracket of clock reads (module docs).
const CLOCK_SLACK: u64 = 1_000_000;

/// Pause before each send of a "slow" connection: longer than the kernel's shortest delayed-ACK
/// timeout (`TCP_DELACK_MIN`, 40 ms), so the peer's ACK of the previous message is delayed and
/// the RTT samples are tens of milliseconds.
const THINK: Duration = Duration::from_millis(60);

/// How often a side polls `TCP_INFO` for `TCP_CLOSE`: the bound on `end_ns` is this loose.
const CLOSE_POLL: Duration = Duration::from_micros(200);

/// `TCP_CLOSE` as `tcpi_state` reports it (`include/net/tcp_states.h`).
const TCP_CLOSE: u8 = 7;

/// Now on the realtime clock, ns since the Unix epoch (the clock of `start_ns` and `end_ns`).
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after the epoch")
        .as_nanos() as u64
}

/// Which side sends the first FIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closer {
    Client,
    Server,
}

/// One connection of the test.
#[derive(Debug, Clone)]
struct Connection {
    v6: bool,
    closer: Closer,
    /// Whether sends wait [`THINK`] first, on a pattern that makes delayed ACKs
    /// ([`Connection::server_thinks`]).
    slow: bool,
    /// (request, response) sizes of each exchange.
    exchanges: Vec<(usize, usize)>,
}

impl Connection {
    /// Whether the server waits [`THINK`] before its response to exchange `i`. Linux delays
    /// an ACK only in ping-pong mode, which a receiver enters by answering within the ACK
    /// timeout (as on even exchanges here) and leaves when its delayed-ACK timer fires: so on
    /// odd exchanges the server's ACK of the request waits for that timer (40 ms or more), the
    /// client's RTT sample of its request with it.
    fn server_thinks(&self, i: usize) -> bool {
        self.slow && !i.is_multiple_of(2)
    }

    /// Whether the client waits [`THINK`] before its request of exchange `i`: after each response
    /// the server thought about (the client answered the one before at once, so it is in
    /// ping-pong mode), which delays the client's ACK and the server's RTT sample the same way.
    fn client_thinks(&self, i: usize) -> bool {
        self.slow && i >= 2 && i.is_multiple_of(2)
    }
}

/// What one side of a connection observed.
#[derive(Clone, Copy)]
struct SideView {
    local: SocketAddr,
    peer: SocketAddr,
    /// Realtime around the start: the client's connect() call, or the server's accept() call.
    started: (u64, u64),
    /// Realtime just before this side's shutdown().
    shutdown_ns: u64,
    /// Realtime when this side first saw its socket in `TCP_CLOSE`.
    closed_ns: u64,
    /// `TCP_INFO` after the last exchange, before any FIN.
    pre: libc::tcp_info,
    /// `TCP_INFO` in `TCP_CLOSE`: the socket's final values.
    last: libc::tcp_info,
}

/// The FIN exchange and the two `TCP_INFO` reads of one side (module docs): waits until its
/// data is acknowledged, reads `pre` between two meetings with the peer, shuts down first (the
/// closer) or after the peer's FIN, and waits for `TCP_CLOSE`.
fn close_and_observe(
    s: &mut TcpStream,
    closes_first: bool,
    meet: &Barrier,
) -> (libc::tcp_info, libc::tcp_info, u64, u64) {
    wait_acked(s);
    meet.wait();
    let pre = tcp_info(s);
    meet.wait();
    let shutdown_ns;
    if closes_first {
        shutdown_ns = now_ns();
        s.shutdown(Shutdown::Write).expect("shutdown");
        assert!(read_to_end(s).is_empty(), "data after the exchanges");
    } else {
        assert!(read_to_end(s).is_empty(), "data after the exchanges");
        shutdown_ns = now_ns();
        s.shutdown(Shutdown::Write).expect("shutdown");
    }
    let deadline = Instant::now() + PATIENCE;
    let last = loop {
        let info = tcp_info(s);
        if info.tcpi_state == TCP_CLOSE {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "socket not closed within {PATIENCE:?} (state {})",
            info.tcpi_state
        );
        thread::sleep(CLOSE_POLL);
    };
    (pre, last, shutdown_ns, now_ns())
}

#[test]
fn end_records_match_tcp_info_field_by_field() {
    exactness(20, "exact", &[], &expected_read_path());
}

#[test]
fn end_records_match_tcp_info_field_by_field_with_probe_reads() {
    exactness(21, "exact-probe-read", &["--probe-reads"], "probe_read");
}

fn exactness(index: u8, test: &str, flags: &[&str], read_path: &str) {
    let started = Instant::now();
    let seed = std::env::var("FLOWLOG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: FLOWLOG_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut connections = Vec::new();
    for v6 in [false, true] {
        for closer in [Closer::Client, Closer::Server] {
            for slow in [false, true] {
                // Slow exchanges fit in one segment each: a full-sized segment or more makes the
                // receiver acknowledge at once, which would hide the delayed ACKs.
                let largest = if slow { 1_000 } else { 200_000 };
                let exchanges = (0..if slow { 6 } else { 3 })
                    .map(|_| (rng.random_range(1..=largest), rng.random_range(1..=largest)))
                    .collect();
                connections.push(Connection {
                    v6,
                    closer,
                    slow,
                    exchanges,
                });
            }
        }
    }
    let mut data = vec![0u8; 200_000];
    rng.fill(&mut data[..]);

    let net = NetnsPair::new(index);
    let port = server_port();
    let v4_addr = SocketAddr::new(net.server_v4, port);
    let v6_addr = SocketAddr::new(net.server_v6, port);
    let v4 = net.listen(v4_addr);
    let v6 = net.listen(v6_addr);
    let mut args = vec!["--interim", NO_INTERIM];
    args.extend_from_slice(flags);
    let agent = Agent::start_with(test, &args);
    assert_eq!(agent.read_path(), read_path, "the agent's socket-read path");

    let meet = Arc::new(Barrier::new(2));
    let server = {
        let (connections, data, meet) = (connections.clone(), data.clone(), Arc::clone(&meet));
        net.server("flt-server", move || {
            let mut views = Vec::new();
            for c in &connections {
                let before = now_ns();
                let (mut s, peer) = accept(if c.v6 { &v6 } else { &v4 });
                let accepted = now_ns();
                // Read now: a socket in TCP_CLOSE has no peer.
                let local = s.local_addr().unwrap();
                for (i, &(request, response)) in c.exchanges.iter().enumerate() {
                    assert_eq!(read_exact(&mut s, request), data[..request], "request");
                    if c.server_thinks(i) {
                        thread::sleep(THINK);
                    }
                    s.write_all(&data[..response]).expect("response");
                }
                let closes_first = c.closer == Closer::Server;
                let (pre, last, shutdown_ns, closed_ns) =
                    close_and_observe(&mut s, closes_first, &meet);
                views.push(SideView {
                    local,
                    peer,
                    started: (before, accepted),
                    shutdown_ns,
                    closed_ns,
                    pre,
                    last,
                });
            }
            views
        })
    };
    let client = {
        let (connections, data, meet) = (connections.clone(), data.clone(), Arc::clone(&meet));
        net.client("flt-client", move || {
            let mut views = Vec::new();
            for c in &connections {
                let before = now_ns();
                let mut s = connect(if c.v6 { v6_addr } else { v4_addr });
                let connected = now_ns();
                let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
                for (i, &(request, response)) in c.exchanges.iter().enumerate() {
                    if c.client_thinks(i) {
                        thread::sleep(THINK);
                    }
                    s.write_all(&data[..request]).expect("request");
                    assert_eq!(read_exact(&mut s, response), data[..response], "response");
                }
                let closes_first = c.closer == Closer::Client;
                let (pre, last, shutdown_ns, closed_ns) =
                    close_and_observe(&mut s, closes_first, &meet);
                views.push(SideView {
                    local,
                    peer,
                    started: (before, connected),
                    shutdown_ns,
                    closed_ns,
                    pre,
                    last,
                });
            }
            views
        })
    };
    let (clients, servers) = join_both(client, server);
    let traffic = started.elapsed();

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| r.len() >= 2 * connections.len());
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(
        records.len(),
        2 * connections.len(),
        "one record per end of each connection: {records:#?}"
    );

    eprintln!(
        "{test}: {:<34} {:>13} {:>13} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9}",
        "socket", "srtt rec/pre", "min rec/pre", "out+", "in+", "start-", "-start", "end-", "-end"
    );
    for (c, (client, server)) in connections.iter().zip(clients.iter().zip(&servers)) {
        assert_eq!(
            client.local, server.peer,
            "the server accepted our connection"
        );
        let second_shutdown = client.shutdown_ns.max(server.shutdown_ns);
        for (side, view, peer) in [
            (Direction::Outbound, client, server),
            (Direction::Inbound, server, client),
        ] {
            let r = one_record(&records, side, view);
            let what = format!("{side:?} end of {c:?}: {r:#?}");
            assert_eq!(r.host, host, "{what}");
            assert_eq!(
                r.family,
                if c.v6 { Family::Ipv6 } else { Family::Ipv4 },
                "{what}"
            );
            assert_eq!(r.outcome, Outcome::Closed, "{what}");
            assert_eq!(r.seq, 0, "{what}");
            assert_eq!((r.resets_sent, r.resets_received), (0, 0), "{what}");

            // Payload: exact, from what the test wrote and read, and from TCP_INFO.
            let requests: u64 = c.exchanges.iter().map(|&(q, _)| q as u64).sum();
            let responses: u64 = c.exchanges.iter().map(|&(_, a)| a as u64).sum();
            let (sent, received) = match side {
                Direction::Outbound => (requests, responses),
                Direction::Inbound => (responses, requests),
            };
            assert_eq!((r.bytes_sent, r.bytes_received), (sent, received), "{what}");
            let syn = u64::from(side == Direction::Outbound);
            assert_eq!(
                (view.last.tcpi_bytes_acked, view.last.tcpi_bytes_received),
                (sent + syn + 1, received + 1),
                "TCP_INFO's sequence space: payload, SYN (connecting side) and FIN: {what}"
            );

            // At the last moment: equal.
            let last = &view.last;
            assert_eq!(
                (r.srtt_us, r.min_rtt_us),
                (last.tcpi_rtt, last.tcpi_min_rtt),
                "srtt/min_rtt vs TCP_INFO in TCP_CLOSE: {what}"
            );
            assert_eq!(
                (r.segs_sent, r.segs_received, r.retransmits),
                (
                    u64::from(last.tcpi_segs_out),
                    u64::from(last.tcpi_segs_in),
                    u64::from(last.tcpi_total_retrans)
                ),
                "segments and retransmits vs TCP_INFO in TCP_CLOSE: {what}"
            );

            // Just before the close: the FIN exchange's bounds.
            let pre = &view.pre;
            let own_retrans = r.retransmits - u64::from(pre.tcpi_total_retrans);
            let peer_retrans =
                u64::from(peer.last.tcpi_total_retrans - peer.pre.tcpi_total_retrans);
            let out = r.segs_sent - u64::from(pre.tcpi_segs_out);
            let inn = r.segs_received - u64::from(pre.tcpi_segs_in);
            let closes_first = matches!(
                (c.closer, side),
                (Closer::Client, Direction::Outbound) | (Closer::Server, Direction::Inbound)
            );
            let (out_range, in_range) = if closes_first {
                ((2, 2 + own_retrans), (1, 2 + peer_retrans))
            } else {
                ((1, 2 + own_retrans), (2, 2 + peer_retrans))
            };
            assert!(
                (out_range.0..=out_range.1).contains(&out)
                    && (in_range.0..=in_range.1).contains(&inn),
                "segments after the pre-close TCP_INFO: sent +{out} (allowed {out_range:?}), \
                 received +{inn} (allowed {in_range:?}), closer: {closes_first}: {what}"
            );
            let p = u64::from(pre.tcpi_rtt);
            let m = (view.closed_ns - view.shutdown_ns).div_ceil(1_000);
            let (low, high) = (7 * p / 8, ((7 * p + 7 + m) / 8).max(p));
            assert!(
                (low..=high).contains(&u64::from(r.srtt_us)),
                "srtt_us {} vs pre-close tcpi_rtt {p}: one sample of at most {m} µs allows \
                 [{low}, {high}]: {what}",
                r.srtt_us
            );
            let pre_min = pre.tcpi_min_rtt;
            assert!(
                r.min_rtt_us == pre_min || u64::from(r.min_rtt_us) <= m.min(u64::from(pre_min)),
                "min_rtt_us {} vs pre-close tcpi_min_rtt {pre_min} (a new minimum must be a \
                 sample of at most {m} µs): {what}",
                r.min_rtt_us
            );

            // Times.
            let (start_low, start_high) = match side {
                Direction::Outbound => client.started,
                Direction::Inbound => (client.started.0, server.started.1),
            };
            let (end_low, end_high) = (second_shutdown, view.closed_ns);
            let within =
                |t: u64, low: u64, high: u64| t + CLOCK_SLACK >= low && t <= high + CLOCK_SLACK;
            assert!(
                within(r.start_ns, start_low, start_high),
                "start_ns {} outside [{start_low}, {start_high}] ± {CLOCK_SLACK} ns: {what}",
                r.start_ns
            );
            assert!(
                within(r.end_ns, end_low, end_high),
                "end_ns {} outside [{end_low}, {end_high}] ± {CLOCK_SLACK} ns: {what}",
                r.end_ns
            );
            let us = |a: u64, b: u64| (a as i64 - b as i64) as f64 / 1e3;
            eprintln!(
                "{test}: {:<34} {:>6}/{:<6} {:>6}/{:<6} {:>4}/{:<4} {:>4}/{:<4} {:>7.0} {:>7.0} \
                 {:>9.0} {:>9.0}",
                format!(
                    "{} {:?}{}",
                    view.local,
                    c.closer,
                    if c.slow { " slow" } else { "" }
                ),
                r.srtt_us,
                p,
                r.min_rtt_us,
                pre_min,
                out,
                format!("{out_range:?}"),
                inn,
                format!("{in_range:?}"),
                us(r.start_ns, start_low),
                us(start_high, r.start_ns),
                us(r.end_ns, end_low),
                us(end_high, r.end_ns),
            );
        }
    }
    // The delayed ACKs did their job (else the RTT comparisons above were of near-equal
    // microsecond values, and prove less than they seem to).
    let slowest = records.iter().map(|r| r.srtt_us).max().unwrap_or(0);
    assert!(
        slowest >= 1_000,
        "no socket had an srtt of 1 ms or more (largest {slowest} µs): the delayed ACKs of the \
         slow connections did not happen"
    );
    eprintln!(
        "{test}: {} sockets equal to TCP_INFO in TCP_CLOSE; traffic took {traffic:?}, the test \
         {:?} (margins in µs: start-/-start = after the lower / before the upper bound)",
        records.len(),
        started.elapsed()
    );
}

/// The record of one side's socket: its 4-tuple as that side sees it, in its direction.
fn one_record<'a>(records: &'a [FlowRecord], side: Direction, view: &SideView) -> &'a FlowRecord {
    let found: Vec<&FlowRecord> = records
        .iter()
        .filter(|r| {
            r.direction == side
                && r.local_addr == view.local.ip()
                && r.local_port == view.local.port()
                && r.remote_addr == view.peer.ip()
                && r.remote_port == view.peer.port()
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {side:?} record of {} -> {}: {found:#?}",
        view.local,
        view.peer
    );
    found[0]
}
