//! Restarts and upgrades lose nothing (issue 13): connections open across an agent's stop and
//! the next agent's start keep their `flow_id`, their `seq` goes on, and the sum of their records
//! is what the test wrote and read, to the byte.
//!
//! Needs root (eBPF, bpffs, network namespaces) and `ip`. Each test pins the kernel state in a
//! directory of its own under /sys/fs/bpf and removes it at the end, failed or not. Real TCP
//! between two namespaces; the agent attached to the host's tracepoints as in production.
//!
//! Each test opens three long-lived connections (IPv4, IPv6, IPv4) and moves bytes both ways
//! before the first agent stops, while no agent runs, and after the second agent started. One
//! connection closes while no agent runs; another opens, moves bytes and closes in the gap; a
//! last one opens after the second agent started (its flow id must continue the same range). The
//! first agent runs with a one-second interim, and the test waits for an interim record of each
//! connection that covers everything sent before the stop, so that the second agent must continue
//! a `seq` that is not 0, from a baseline it never saw; the second agent too writes an interim
//! record of each before the last transfers.
//!
//! Checked for every side of every connection (the agent sees both ends): one `flow_id` over
//! both agents' records, its `seq`s exactly 0..n with no gap and no repeat, exactly one end
//! record (the last), and bytes sent and received summed over its records equal to what that
//! side wrote and read. Over all records: `(flow_id, seq)` unique.
mod support;

use std::{
    collections::{BTreeMap, HashSet},
    io::Write,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use flowlog_sidecar::record::{Direction, FlowRecord, Outcome};
use support::*;

/// The interim interval of the agents: short, so that each connection has records before the
/// gap (its `seq` then continues from a number above 0).
const INTERIM: &str = "1s";

/// How long no agent runs: longer than the interim interval and than a sweep period, so that
/// the kernel side, alone, sees transfers, a close and a whole connection.
const GAP: Duration = Duration::from_millis(1500);

/// A pin directory of the test's own under /sys/fs/bpf; removed (pins and directory) on drop,
/// also when the test fails. Declared before the agents, so that it goes after them.
struct PinDirGuard(PathBuf);

impl PinDirGuard {
    fn new(test: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/flowlog-test-{}-{test}",
            std::process::id()
        ));
        remove_pins(&dir);
        Self(dir)
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        remove_pins(&self.0);
    }
}

fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// One long-lived connection, both ends held by the test, and what each end wrote and read.
struct Conn {
    client: TcpStream,
    server: TcpStream,
    /// The client's local port: tells its two flows (client side, server side) apart.
    port: u16,
    client_wrote: u64,
    server_wrote: u64,
}

impl Conn {
    fn open(net: &NetnsPair, listener: &TcpListener, addr: SocketAddr) -> Self {
        let client = join(net.client("flt-connect", move || connect(addr)));
        let (server, peer) = accept(listener);
        Self {
            port: peer.port(),
            client,
            server,
            client_wrote: 0,
            server_wrote: 0,
        }
    }

    /// `up` bytes client → server and `down` bytes server → client, each read in full by the
    /// peer and acknowledged, so that the kernel's counters hold them.
    fn transfer(&mut self, up: usize, down: usize) {
        move_bytes(&self.client, &self.server, up);
        move_bytes(&self.server, &self.client, down);
        wait_acked(&self.client);
        wait_acked(&self.server);
        self.client_wrote += up as u64;
        self.server_wrote += down as u64;
    }

    /// An orderly close, both ways; waits until both sockets are gone from the flow map's view
    /// (the client's in `TIME_WAIT` or closed, the server's closed).
    fn close(self) -> Totals {
        let totals = self.totals();
        let Conn {
            mut client,
            mut server,
            ..
        } = self;
        client.shutdown(Shutdown::Write).expect("client shutdown");
        assert!(read_to_end(&mut server).is_empty(), "data after the test's");
        server.shutdown(Shutdown::Write).expect("server shutdown");
        assert!(read_to_end(&mut client).is_empty(), "data after the test's");
        drop(client);
        drop(server);
        totals
    }

    fn totals(&self) -> Totals {
        Totals {
            port: self.port,
            client_wrote: self.client_wrote,
            server_wrote: self.server_wrote,
        }
    }
}

/// What the two ends of a connection moved, for the checks.
#[derive(Debug, Clone, Copy)]
struct Totals {
    port: u16,
    client_wrote: u64,
    server_wrote: u64,
}

/// Writes `n` bytes on `from` (from another thread) and reads them on `to`.
fn move_bytes(from: &TcpStream, to: &TcpStream, n: usize) {
    let mut writer = from.try_clone().expect("cloning the socket");
    let sender = thread::spawn(move || {
        let data = vec![0x5a_u8; n];
        writer.write_all(&data).expect("writing");
    });
    let mut reader = to.try_clone().expect("cloning the socket");
    assert_eq!(read_exact(&mut reader, n).len(), n);
    join(sender);
}

/// The records of one side of one connection: the client's (outbound, local port `port`) or
/// the server's (inbound, remote port `port`).
fn side(records: &[FlowRecord], port: u16, client: bool) -> Vec<FlowRecord> {
    let mut out: Vec<FlowRecord> = records
        .iter()
        .filter(|r| {
            if client {
                r.local_port == port
            } else {
                r.remote_port == port
            }
        })
        .cloned()
        .collect();
    out.sort_by_key(|r| r.seq);
    out
}

/// The checks of the module docs for one side: one flow id, `seq` 0..n, one end record (the
/// last), exact sums. Returns the side's records.
fn check_side(what: &str, records: &[FlowRecord], sent: u64, received: u64) {
    assert!(!records.is_empty(), "{what}: no record");
    let ids: HashSet<u64> = records.iter().map(|r| r.flow_id).collect();
    assert_eq!(
        ids.len(),
        1,
        "{what}: one flow id, not {ids:?}: {records:#?}"
    );
    let seqs: Vec<u32> = records.iter().map(|r| r.seq).collect();
    let expected: Vec<u32> = (0..records.len() as u32).collect();
    assert_eq!(seqs, expected, "{what}: seq 0..n without gap or repeat");
    let ends = records
        .iter()
        .filter(|r| r.outcome != Outcome::Open)
        .count();
    assert_eq!(ends, 1, "{what}: one end record: {records:#?}");
    assert_eq!(
        records.last().map(|r| r.outcome),
        Some(Outcome::Closed),
        "{what}: the end record is the last"
    );
    let sum_sent: u64 = records.iter().map(|r| r.bytes_sent).sum();
    let sum_received: u64 = records.iter().map(|r| r.bytes_received).sum();
    assert_eq!(
        (sum_sent, sum_received),
        (sent, received),
        "{what}: bytes sent and received over its records: {records:#?}"
    );
}

fn assert_unique_flow_seq(records: &[FlowRecord]) {
    let mut seen = HashSet::new();
    for r in records {
        assert!(
            seen.insert((r.flow_id, r.seq)),
            "(flow_id, seq) = ({}, {}) twice",
            r.flow_id,
            r.seq
        );
    }
}

/// How the first agent goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Term,
    Kill,
}

#[test]
fn connections_continue_across_sigterm_and_restart() {
    across_a_restart(50, "restart-term", Stop::Term);
}

#[test]
fn connections_continue_across_kill_9_and_restart() {
    across_a_restart(51, "restart-kill", Stop::Kill);
}

fn across_a_restart(index: u8, test: &str, stop: Stop) {
    let pins = PinDirGuard::new(test);
    let net = NetnsPair::new(index);
    let port = server_port();
    let v4 = SocketAddr::new(net.server_v4, port);
    let v6 = SocketAddr::new(net.server_v6, port);
    let listen_v4 = net.listen(v4);
    let listen_v6 = net.listen(v6);
    let ours = net.flows(port);
    let args = ["--interim", INTERIM, "--pin-dir", &pins.arg()];

    let first = Agent::start_run(test, &format!("{test}-1"), &args);
    assert!(
        first.stderr().contains("pinned the kernel state"),
        "the first agent pins: {}",
        first.stderr()
    );
    let base = read_pin_state(&pins.0, flowlog_common::pin_state::FLOW_ID_BASE);
    let first_links = links(&pins.0);
    let mut conns = vec![
        Conn::open(&net, &listen_v4, v4),
        Conn::open(&net, &listen_v6, v6),
        Conn::open(&net, &listen_v4, v4),
    ];
    for (i, c) in conns.iter_mut().enumerate() {
        c.transfer(100_000 + 1_111 * i, 50_000 + 333 * i);
    }
    // An interim record of each side that covers everything so far, so that the second agent
    // continues from a seq above 0 and from a baseline it never saw.
    let before: Vec<Totals> = conns.iter().map(Conn::totals).collect();
    first.wait_for(&ours, |records| {
        before.iter().all(|t| {
            let covered = |client: bool, sent: u64| {
                let side = side(records, t.port, client);
                side.iter().map(|r| r.bytes_sent).sum::<u64>() == sent
            };
            covered(true, t.client_wrote) && covered(false, t.server_wrote)
        })
    });
    let first_records = match stop {
        Stop::Term => first.stop(),
        Stop::Kill => first.kill(),
    };

    // No agent runs: the kernel side alone sees transfers, a close and a whole connection.
    for (i, c) in conns.iter_mut().enumerate() {
        c.transfer(70_000 + 777 * i, 20_000 + 99 * i);
    }
    let closed_in_gap = conns.remove(2).close();
    let mut whole_in_gap = Conn::open(&net, &listen_v6, v6);
    whole_in_gap.transfer(33_333, 44_444);
    let whole_in_gap = whole_in_gap.close();
    thread::sleep(GAP);

    let second = Agent::start_run(test, &format!("{test}-2"), &args);
    assert!(
        second.stderr().contains("took over the kernel state"),
        "the second agent takes over: {}",
        second.stderr()
    );
    assert_eq!(
        read_pin_state(&pins.0, flowlog_common::pin_state::FLOW_ID_BASE),
        base,
        "the flow-id base survives the restart"
    );
    // The second agent's programs replaced the first's: as many links, none of the first's.
    let second_links = links(&pins.0);
    assert_eq!(second_links.len(), first_links.len(), "{second_links:?}");
    assert!(
        second_links.iter().all(|l| !first_links.contains(l)),
        "the first agent's links are gone: {first_links:?} then {second_links:?}"
    );
    // A connection the second agent's programs start: its id continues the same range, and
    // the unique (flow_id, seq) check below fails if it repeats one.
    let mut after_restart = Conn::open(&net, &listen_v4, v4);
    after_restart.transfer(11_111, 22_222);
    let after_restart = after_restart.close();
    // An interim record of each long-lived side from the second agent, for a flow it had not
    // seen before (its first record continues the first agent's `seq` and baseline), ...
    second.wait_for(&ours, |records| {
        conns.iter().all(|c| {
            [true, false]
                .iter()
                .all(|&client| !side(records, c.port, client).is_empty())
        })
    });
    // ... then more bytes, which its end records carry as deltas from its own records.
    for (i, c) in conns.iter_mut().enumerate() {
        c.transfer(60_000 + 555 * i, 80_000 + 11 * i);
    }
    let mut totals: Vec<Totals> = conns.into_iter().map(Conn::close).collect();
    totals.push(closed_in_gap);
    totals.push(whole_in_gap);
    totals.push(after_restart);
    let expected_ends = 2 * totals.len();
    second.wait_for(&ours, |records| {
        records
            .iter()
            .filter(|r| r.outcome != Outcome::Open)
            .count()
            >= expected_ends
    });
    let page = second.metrics();
    let second_records = second.stop();

    let first_ours: Vec<FlowRecord> = first_records.into_iter().filter(&ours).collect();
    let second_ours: Vec<FlowRecord> = second_records.into_iter().filter(&ours).collect();
    let all: Vec<FlowRecord> = first_ours.iter().chain(&second_ours).cloned().collect();
    assert_unique_flow_seq(&all);
    let mut summary = BTreeMap::new();
    for t in &totals {
        for client in [true, false] {
            let what = format!(
                "{} side of the connection from port {}",
                if client { "client" } else { "server" },
                t.port
            );
            let (sent, received) = if client {
                (t.client_wrote, t.server_wrote)
            } else {
                (t.server_wrote, t.client_wrote)
            };
            let records = side(&all, t.port, client);
            check_side(&what, &records, sent, received);
            let before_gap = side(&first_ours, t.port, client).len();
            summary.insert(what, (before_gap, records.len(), sent, received));
        }
    }
    // The connections open across the gap had records from both agents.
    for t in &before[..2] {
        for client in [true, false] {
            assert!(
                !side(&first_ours, t.port, client).is_empty()
                    && !side(&second_ours, t.port, client).is_empty(),
                "port {}: records from both agents",
                t.port
            );
        }
    }
    assert_eq!(
        Agent::metric(&page, "flowlog_sidecar_pinned"),
        Some(1.0),
        "pinned gauge"
    );
    assert_eq!(
        Agent::metric(
            &page,
            "flowlog_sidecar_kernel_drops_total{reason=\"ringbuf_full\"}"
        ),
        Some(0.0),
        "no record lost to a full ring buffer"
    );
    eprintln!("{test}: (records by the first agent, records, bytes sent, received): {summary:#?}");
}

/// An upgrade whose kernel layout differs: the second agent must not reuse the pins (it finds
/// another layout id in them, written here as an older build would have), says so, removes them
/// and starts afresh. The connections open across it keep the records the first agent wrote,
/// exact up to its stop, and the second agent adopts them (it cannot know what was reported of
/// them): a new flow id, every record marked `adopted`, summing to everything since the connect
/// (README says how consumers then count each byte once). A connection opened after the upgrade
/// is exact and not adopted.
#[test]
fn an_upgrade_with_another_layout_falls_back_and_says_so() {
    let test = "restart-layout";
    let pins = PinDirGuard::new(test);
    let net = NetnsPair::new(52);
    let port = server_port();
    let v4 = SocketAddr::new(net.server_v4, port);
    let listen_v4 = net.listen(v4);
    let ours = net.flows(port);
    let args = ["--interim", INTERIM, "--pin-dir", &pins.arg()];

    let first = Agent::start_run(test, &format!("{test}-1"), &args);
    let mut old = Conn::open(&net, &listen_v4, v4);
    old.transfer(123_456, 65_432);
    let before = old.totals();
    first.wait_for(&ours, |records| {
        side(records, before.port, true)
            .iter()
            .map(|r| r.bytes_sent)
            .sum::<u64>()
            == before.client_wrote
            && side(records, before.port, false)
                .iter()
                .map(|r| r.bytes_sent)
                .sum::<u64>()
                == before.server_wrote
    });
    let first_records = first.stop();
    write_layout_id(&pins.0, 0x0bad_1a70);

    old.transfer(10_000, 20_000);
    let second = Agent::start_run(test, &format!("{test}-2"), &args);
    let log = second.stderr();
    assert!(
        log.contains("cannot be taken over") && log.contains("0xbad1a70"),
        "the second agent says it cannot take over the pins, and why: {log}"
    );
    old.transfer(30_000, 40_000);
    let mut new = Conn::open(&net, &listen_v4, v4);
    new.transfer(77_777, 88_888);
    let new = new.close();
    let whole = old.close();
    second.wait_for(&ours, |records| {
        [new.port, whole.port].iter().all(|&port| {
            [true, false].iter().all(|&client| {
                side(records, port, client)
                    .iter()
                    .any(|r| r.outcome != Outcome::Open)
            })
        })
    });
    let second_records = second.stop();

    let first_ours: Vec<FlowRecord> = first_records.into_iter().filter(&ours).collect();
    let second_ours: Vec<FlowRecord> = second_records.into_iter().filter(&ours).collect();
    let all: Vec<FlowRecord> = first_ours.iter().chain(&second_ours).cloned().collect();
    assert_unique_flow_seq(&all);
    for client in [true, false] {
        let (sent, received) = if client {
            (before.client_wrote, before.server_wrote)
        } else {
            (before.server_wrote, before.client_wrote)
        };
        let old_side = side(&first_ours, before.port, client);
        let ids: HashSet<u64> = old_side.iter().map(|r| r.flow_id).collect();
        assert_eq!(ids.len(), 1, "old connection: one flow id");
        let seqs: Vec<u32> = old_side.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (0..old_side.len() as u32).collect::<Vec<_>>());
        assert_eq!(
            (
                old_side.iter().map(|r| r.bytes_sent).sum::<u64>(),
                old_side.iter().map(|r| r.bytes_received).sum::<u64>()
            ),
            (sent, received),
            "old connection, first agent: exact up to its stop"
        );
        let (sent, received) = if client {
            (whole.client_wrote, whole.server_wrote)
        } else {
            (whole.server_wrote, whole.client_wrote)
        };
        let adopted = side(&second_ours, before.port, client);
        check_side("old connection, adopted", &adopted, sent, received);
        assert!(
            adopted
                .iter()
                .all(|r| r.adopted && !ids.contains(&r.flow_id)),
            "the second agent adopts the old connection under a new flow id: {adopted:#?}"
        );
        let (sent, received) = if client {
            (new.client_wrote, new.server_wrote)
        } else {
            (new.server_wrote, new.client_wrote)
        };
        let new_side = side(&second_ours, new.port, client);
        check_side(
            "connection opened after the upgrade",
            &new_side,
            sent,
            received,
        );
        assert!(new_side.iter().all(|r| !r.adopted), "{new_side:#?}");
    }
}

/// Connections open before the agent's first start (issue 13 part 2): the agent adopts them at
/// start, and reports them like any flow from then on, marked `adopted`, their first record
/// counting everything since they were opened. Checked for both sides of an IPv4 and an IPv6
/// connection with transfers before the agent and after it started: one flow id, `seq` 0..n,
/// one end record, sums equal to everything each side wrote and read since the connect; the
/// direction inferred (the server side's port has a listener in its namespace, the client's
/// none); the process that holds the sockets (this test) as their owner; the start no earlier
/// than the agent's. A connection opened after the start is not adopted.
#[test]
fn connections_open_before_the_agent_started_are_adopted() {
    let test = "adopt";
    let net = NetnsPair::new(54);
    let port = server_port();
    let v4 = SocketAddr::new(net.server_v4, port);
    let v6 = SocketAddr::new(net.server_v6, port);
    let listen_v4 = net.listen(v4);
    let listen_v6 = net.listen(v6);
    let ours = net.flows(port);

    let mut old = vec![
        Conn::open(&net, &listen_v4, v4),
        Conn::open(&net, &listen_v6, v6),
    ];
    for (i, c) in old.iter_mut().enumerate() {
        c.transfer(40_000 + 1_234 * i, 90_000 + 77 * i);
    }
    let before_start = epoch_ns();
    let agent = Agent::start_with(test, &["--interim", INTERIM]);
    let log = agent.stderr();
    assert!(
        log.contains("adopted the connections open before the agent started"),
        "the agent says what it adopted: {log}"
    );
    // An interim record of each side first: the first record carries what the socket moved
    // before the agent, the later ones only what came after.
    agent.wait_for(&ours, |records| {
        old.iter().all(|c| {
            [true, false]
                .iter()
                .all(|&client| !side(records, c.port, client).is_empty())
        })
    });
    for (i, c) in old.iter_mut().enumerate() {
        c.transfer(3_000 + 10 * i, 7_000 + 20 * i);
    }
    let mut new = Conn::open(&net, &listen_v4, v4);
    new.transfer(5_555, 6_666);
    let new = new.close();
    let old: Vec<Totals> = old.into_iter().map(Conn::close).collect();
    agent.wait_for(&ours, |records| {
        records
            .iter()
            .filter(|r| r.outcome != Outcome::Open)
            .count()
            >= 2 * (old.len() + 1)
    });
    let page = agent.metrics();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&ours).collect();

    assert_unique_flow_seq(&records);
    let me = std::process::id();
    let comm = std::fs::read_to_string(format!("/proc/{me}/comm"))
        .expect("this process's name")
        .trim_end()
        .to_string();
    for (t, adopted) in old.iter().map(|t| (t, true)).chain([(&new, false)]) {
        for client in [true, false] {
            let what = format!(
                "{} side of the {} connection from port {}",
                if client { "client" } else { "server" },
                if adopted { "adopted" } else { "new" },
                t.port
            );
            let (sent, received) = if client {
                (t.client_wrote, t.server_wrote)
            } else {
                (t.server_wrote, t.client_wrote)
            };
            let records = side(&records, t.port, client);
            check_side(&what, &records, sent, received);
            let first = &records[0];
            assert!(
                records.iter().all(|r| r.adopted == adopted),
                "{what}: adopted = {adopted} on every record: {records:#?}"
            );
            let direction = if client {
                Direction::Outbound
            } else {
                Direction::Inbound
            };
            assert_eq!(first.direction, direction, "{what}: direction");
            if adopted {
                assert!(
                    first.start_ns >= before_start && first.start_ns <= first.end_ns,
                    "{what}: starts when adopted, after {before_start}: {first:#?}"
                );
                assert!(
                    records.len() >= 2,
                    "{what}: an interim record before the end: {records:#?}"
                );
                assert_eq!(
                    (first.pid, first.comm.as_deref(), first.cgroup_id),
                    (Some(me), Some(comm.as_str()), own_cgroup_id()),
                    "{what}: owned by this test's process"
                );
            }
        }
    }
    let adopted = Agent::metric(&page, "flowlog_sidecar_adopted_flows_total").unwrap_or(0.0);
    assert!(
        adopted >= 4.0,
        "flowlog_sidecar_adopted_flows_total counts at least this test's 4 sockets: {adopted}"
    );
}

fn epoch_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as u64
}

/// The names of the pinned program links (one per attached program and tracepoint).
fn links(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .expect("the pin directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("link-"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no pinned link in {}", dir.display());
    out
}

/// One value of the pinned `PIN_STATE`.
fn read_pin_state(dir: &Path, index: u32) -> u64 {
    use aya::maps::{Array, Map, MapData};
    let path = dir.join("PIN_STATE");
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = Map::from_map_data(data).expect("an array map");
    let array: Array<MapData, u64> = Array::try_from(map).expect("an array of u64");
    array.get(&index, 0).expect("reading PIN_STATE")
}

/// Writes another layout id into the pinned `PIN_STATE`, as a build with another kernel layout
/// would have left it.
fn write_layout_id(dir: &Path, id: u64) {
    use aya::maps::{Array, Map, MapData};
    let path = dir.join("PIN_STATE");
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = Map::from_map_data(data).expect("an array map");
    let mut array: Array<MapData, u64> = Array::try_from(map).expect("an array of u64");
    array
        .set(flowlog_common::pin_state::LAYOUT_ID, id, 0)
        .expect("writing the layout id");
}

/// A final stop: after a pinned agent's SIGTERM, `--unpin` takes the pins over, writes the flows
/// still open as `open` records (exact: what moved before and after the first agent stopped),
/// detaches the programs and removes the pin directory.
#[test]
fn unpin_reports_open_flows_and_removes_the_pins() {
    let test = "restart-unpin";
    let pins = PinDirGuard::new(test);
    let net = NetnsPair::new(53);
    let port = server_port();
    let v4 = SocketAddr::new(net.server_v4, port);
    let listen_v4 = net.listen(v4);
    let ours = net.flows(port);
    let args = ["--interim", INTERIM, "--pin-dir", &pins.arg()];

    let first = Agent::start_run(test, &format!("{test}-1"), &args);
    let mut conn = Conn::open(&net, &listen_v4, v4);
    conn.transfer(54_321, 12_345);
    first.wait_for(&ours, |records| {
        side(records, conn.port, true).len() == 1 && side(records, conn.port, false).len() == 1
    });
    let first_records = first.stop();
    conn.transfer(1_000, 2_000);
    let mut unpin_args = args.to_vec();
    unpin_args.push("--unpin");
    let final_stop = Agent::start_run(test, &format!("{test}-2"), &unpin_args);
    let final_records = final_stop.stop();
    assert!(
        !pins.0.exists(),
        "--unpin removes the pin directory: {:?}",
        std::fs::read_dir(&pins.0).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    let all: Vec<FlowRecord> = first_records
        .into_iter()
        .chain(final_records)
        .filter(&ours)
        .collect();
    assert_unique_flow_seq(&all);
    let t = conn.totals();
    for (client, sent, received) in [
        (true, t.client_wrote, t.server_wrote),
        (false, t.server_wrote, t.client_wrote),
    ] {
        let records = side(&all, t.port, client);
        let seqs: Vec<u32> = records.iter().map(|r| r.seq).collect();
        let expected: Vec<u32> = (0..records.len() as u32).collect();
        assert!(
            records.len() >= 2 && seqs == expected,
            "interim records, then the final stop's: {seqs:?}"
        );
        assert!(records.iter().all(|r| r.outcome == Outcome::Open));
        assert_eq!(
            (
                records.iter().map(|r| r.bytes_sent).sum::<u64>(),
                records.iter().map(|r| r.bytes_received).sum::<u64>()
            ),
            (sent, received)
        );
    }
    drop(conn);
}

/// A connection whose handshake completed before the agent started but that its server had not
/// accepted yet: no file holds the server's socket then, so adoption cannot see it, and the
/// accept, once the agent runs, is the first the programs see of it. The accept starts its
/// inbound flow (the path of a start the state-change program was skipped for, counted in
/// `late_starts`): one flow id, `seq` 0..n, not marked adopted, starting no earlier than the
/// agent, owned by the accepting process, its sums counting the bytes that waited in the
/// receive queue since before the agent started. The client's socket, held by a file, is
/// adopted as usual.
#[test]
fn a_connection_accepted_after_the_agent_started_is_started_at_its_accept() {
    let test = "late-start";
    let net = NetnsPair::new(55);
    let port = server_port();
    let addr = SocketAddr::new(net.server_v4, port);
    let listener = net.listen(addr);
    let ours = net.flows(port);

    let client = join(net.client("flt-connect", move || connect(addr)));
    let early = 30_000;
    (&client)
        .write_all(&vec![0x5a_u8; early])
        .expect("writing before the accept");
    wait_acked(&client);
    let before_start = epoch_ns();
    let agent = Agent::start_with(test, &["--interim", INTERIM]);
    let (server, peer) = accept(&listener);
    let mut conn = Conn {
        port: peer.port(),
        client,
        server,
        client_wrote: early as u64,
        server_wrote: 0,
    };
    assert_eq!(
        read_exact(&mut conn.server, early).len(),
        early,
        "the bytes written before the accept"
    );
    conn.transfer(4_321, 8_765);
    let totals = conn.close();
    agent.wait_for(&ours, |records| {
        records
            .iter()
            .filter(|r| r.outcome != Outcome::Open)
            .count()
            >= 2
    });
    // The kernel counters are exported once a second.
    let late_starts = || Agent::metric(&agent.metrics(), "flowlog_sidecar_late_starts_total");
    let deadline = std::time::Instant::now() + PATIENCE;
    while late_starts() < Some(1.0) && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let late = late_starts();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&ours).collect();

    assert_unique_flow_seq(&records);
    let server = side(&records, totals.port, false);
    check_side(
        "server side, started at its accept",
        &server,
        totals.server_wrote,
        totals.client_wrote,
    );
    let first = &server[0];
    assert_eq!(first.direction, Direction::Inbound, "{first:#?}");
    assert!(server.iter().all(|r| !r.adopted), "{server:#?}");
    assert!(
        first.start_ns >= before_start && first.start_ns <= first.end_ns,
        "starts at the accept, after {before_start}: {first:#?}"
    );
    let me = std::process::id();
    assert_eq!(
        first.pid,
        Some(me),
        "owned by the accepting process: {first:#?}"
    );
    let client = side(&records, totals.port, true);
    check_side(
        "client side, adopted",
        &client,
        totals.client_wrote,
        totals.server_wrote,
    );
    assert!(client.iter().all(|r| r.adopted), "{client:#?}");
    // At least: the agent sees the whole host, where other tests accept connections too.
    assert!(
        late >= Some(1.0),
        "flowlog_sidecar_late_starts_total counts this test's accept: {late:?}"
    );
}
