//! Integration tests of the agent on real kernel traffic: TCP between two network namespaces that
//! each test creates, the agent attached to the host's tracepoints, and its JSON-lines records
//! compared with what the test itself wrote, read and got from the kernel (TCP_INFO).
//!
//! Needs root (eBPF, network namespaces), `ip` and `nft`. Each test has its own index (its
//! addresses and namespaces, see `support`) and its own agent; they run in parallel. The agents
//! see every TCP flow of the host: a process that makes connections very fast at the same time
//! (the churn benchmark) overflows their ring buffers, and records go missing; the tests say so
//! when they fail that way.
//!
//! Sizes are random; each test prints its seed, and `FLOWLOG_TEST_SEED=<seed>` replays it.
mod support;

use std::{
    collections::{HashMap, HashSet},
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use flowlog_sidecar::record::{Direction, Family, FlowRecord, Outcome};
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::*;

/// No interim record for the length of any test: every flow gets exactly its end record.
const NO_INTERIM: &str = "1h";

/// A seeded random generator; the seed is printed, and `FLOWLOG_TEST_SEED` replays it.
fn rng(test: &str) -> StdRng {
    let seed = std::env::var("FLOWLOG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: FLOWLOG_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut data = vec![0u8; n];
    rng.fill(&mut data[..]);
    data
}

fn family_of(addr: IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::Ipv4,
        IpAddr::V6(_) => Family::Ipv6,
    }
}

/// The one record of `records` for which `pred` holds; panics if there are none or several.
fn one<'a>(
    records: &'a [FlowRecord],
    what: &str,
    pred: impl Fn(&FlowRecord) -> bool,
) -> &'a FlowRecord {
    let found: Vec<&FlowRecord> = records.iter().filter(|r| pred(r)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one record for {what}, found {}: {found:#?}\nall records: {records:#?}",
        found.len()
    );
    found[0]
}

/// The client's record of the connection `client` → `server`.
fn outbound(records: &[FlowRecord], client: SocketAddr, server: SocketAddr) -> &FlowRecord {
    one(records, &format!("outbound {client} -> {server}"), |r| {
        r.direction == Direction::Outbound
            && r.local_addr == client.ip()
            && r.local_port == client.port()
            && r.remote_addr == server.ip()
            && r.remote_port == server.port()
    })
}

/// The server's record of the connection `client` → `server` (the mirrored 4-tuple).
fn inbound(records: &[FlowRecord], client: SocketAddr, server: SocketAddr) -> &FlowRecord {
    one(records, &format!("inbound {client} -> {server}"), |r| {
        r.direction == Direction::Inbound
            && r.local_addr == server.ip()
            && r.local_port == server.port()
            && r.remote_addr == client.ip()
            && r.remote_port == client.port()
    })
}

/// Fields every record of a test's agent must have right.
fn assert_common(r: &FlowRecord, agent_host: &str) {
    assert_eq!(r.host, agent_host, "host: {r:#?}");
    assert_eq!(r.family, family_of(r.local_addr), "family: {r:#?}");
    assert!(r.start_ns <= r.end_ns, "start after end: {r:#?}");
}

/// Who ends a connection of the transfer test, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client sends the request and shuts down its side (FIN first); the server reads to
    /// the end, answers and closes.
    ClientFirst,
    /// The server reads the request, answers and closes (FIN first); the client reads to the
    /// end and closes.
    ServerFirst,
    /// The server reads the first half of the request, answers and shuts down its side (FIN
    /// first); the client reads to the end, then sends the second half and closes: payload after
    /// the peer's FIN.
    ServerHalfClose,
}

/// One connection of the transfer test.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    v6: bool,
    request: usize,
    response: usize,
    ending: Ending,
}

/// How the agent under test reads sockets: its default (the BTF-typed tracepoint where the kernel
/// allows it, as this project's kernels do: see `expected_read_path`), or the raw tracepoint with
/// probe reads that it falls back to elsewhere. Both must give the same records; the tests that
/// read the most fields run on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Default,
    ProbeRead,
}

impl Access {
    /// Starts the test's agent this way, and checks that it reports the access it was asked for.
    fn start(self, test: &str) -> Agent {
        let agent = match self {
            Access::Default => Agent::start(test, NO_INTERIM),
            Access::ProbeRead => {
                Agent::start_with(test, &["--interim", NO_INTERIM, "--probe-reads"])
            }
        };
        let expected = match self {
            Access::Default => expected_read_path(),
            Access::ProbeRead => "probe_read".to_string(),
        };
        assert_eq!(
            agent.read_path(),
            expected,
            "{self:?}: the agent's read path"
        );
        agent
    }
}

#[test]
fn transfers_of_random_sizes_are_exact_on_both_ends() {
    transfers(1, "transfers", Access::Default);
}

#[test]
fn transfers_of_random_sizes_are_exact_on_both_ends_with_probe_reads() {
    transfers(12, "transfers-probe-read", Access::ProbeRead);
}

fn transfers(index: u8, test: &str, access: Access) {
    let net = NetnsPair::new(index);
    let port = server_port();
    let mut rng = rng(test);
    let mut exchanges = Vec::new();
    for v6 in [false, true] {
        for ending in [
            Ending::ClientFirst,
            Ending::ServerFirst,
            Ending::ServerHalfClose,
        ] {
            for _ in 0..2 {
                exchanges.push(Exchange {
                    v6,
                    request: rng.random_range(1..=400_000),
                    response: rng.random_range(1..=400_000),
                    ending,
                });
            }
            // A small one, and the zero-byte connection.
            exchanges.push(Exchange {
                v6,
                request: rng.random_range(1..=1_500),
                response: rng.random_range(1..=1_500),
                ending,
            });
            exchanges.push(Exchange {
                v6,
                request: 0,
                response: 0,
                ending,
            });
        }
    }
    let largest = exchanges
        .iter()
        .map(|e| e.request.max(e.response))
        .max()
        .unwrap();
    let data = random_bytes(&mut rng, largest);
    let v4_addr = SocketAddr::new(net.server_v4, port);
    let v6_addr = SocketAddr::new(net.server_v6, port);
    let v4 = net.listen(v4_addr);
    let v6 = net.listen(v6_addr);

    let agent = access.start(test);
    let server = {
        let (exchanges, data) = (exchanges.clone(), data.clone());
        net.server("flt-server", move || {
            for e in &exchanges {
                let (mut s, _) = accept(if e.v6 { &v6 } else { &v4 });
                let half = e.request / 2;
                let request = match e.ending {
                    Ending::ClientFirst => read_to_end(&mut s),
                    Ending::ServerFirst => read_exact(&mut s, e.request),
                    Ending::ServerHalfClose => read_exact(&mut s, half),
                };
                s.write_all(&data[..e.response])
                    .expect("writing the response");
                let request = if e.ending == Ending::ServerHalfClose {
                    s.shutdown(Shutdown::Write).expect("shutdown");
                    [request, read_to_end(&mut s)].concat()
                } else {
                    request
                };
                assert_eq!(request, data[..e.request], "request of {e:?}");
                drop(s); // FIN (first, or in answer to the client's)
            }
        })
    };
    let client = {
        let (exchanges, data) = (exchanges.clone(), data.clone());
        net.client("flt-client", move || {
            let mut tuples = Vec::new();
            for e in &exchanges {
                let mut s = connect(if e.v6 { v6_addr } else { v4_addr });
                tuples.push((s.local_addr().unwrap(), s.peer_addr().unwrap()));
                let half = e.request / 2;
                match e.ending {
                    Ending::ClientFirst => {
                        s.write_all(&data[..e.request]).expect("request");
                        s.shutdown(Shutdown::Write).expect("shutdown");
                    }
                    Ending::ServerFirst => s.write_all(&data[..e.request]).expect("request"),
                    Ending::ServerHalfClose => s.write_all(&data[..half]).expect("request"),
                }
                let response = read_to_end(&mut s);
                assert_eq!(response, data[..e.response], "response of {e:?}");
                if e.ending == Ending::ServerHalfClose {
                    s.write_all(&data[half..e.request])
                        .expect("request after the server's FIN");
                }
            }
            tuples
        })
    };
    let (tuples, ()) = join_both(client, server);

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| r.len() >= 2 * exchanges.len());
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(
        records.len(),
        2 * exchanges.len(),
        "one record per end of each connection: {records:#?}"
    );
    for (e, &(client, server)) in exchanges.iter().zip(&tuples) {
        let out = outbound(&records, client, server);
        let inb = inbound(&records, client, server);
        for r in [out, inb] {
            assert_common(r, &host);
            assert_eq!(r.family, if e.v6 { Family::Ipv6 } else { Family::Ipv4 });
            assert_eq!(r.outcome, Outcome::Closed, "outcome of {e:?}: {r:#?}");
            assert_eq!(r.seq, 0, "{r:#?}");
            assert_eq!((r.resets_sent, r.resets_received), (0, 0), "{r:#?}");
        }
        assert_eq!(
            (out.bytes_sent, out.bytes_received),
            (e.request as u64, e.response as u64),
            "client's record of {e:?}: {out:#?}"
        );
        assert_eq!(
            (inb.bytes_sent, inb.bytes_received),
            (e.response as u64, e.request as u64),
            "server's record of {e:?}: {inb:#?}"
        );
        assert_ne!(out.flow_id, inb.flow_id, "two sockets, two flows");
        assert_eq!(out.pid, Some(std::process::id()), "{out:#?}");
    }
}

#[test]
fn connect_to_a_closed_port_is_failed() {
    let net = NetnsPair::new(2);
    let closed = server_port() + 1;
    let agent = Agent::start("refused", NO_INTERIM);
    let (v4, v6) = (
        SocketAddr::new(net.server_v4, closed),
        SocketAddr::new(net.server_v6, closed),
    );
    // Two connects with the port chosen by connect(), one from a port bound beforehand (so the
    // test knows the local port exactly).
    let client_v4 = net.client_v4;
    let bound_port = join(net.client("flt-refused", move || {
        for addr in [v4, v6] {
            let err = std::net::TcpStream::connect_timeout(&addr, PATIENCE).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "connect {addr}");
        }
        let socket = ipv4_socket();
        bind_v4(&socket, SocketAddr::new(client_v4, 0));
        let local = socket.local_addr().unwrap();
        let err = connect_v4(&socket, v4).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "bound connect");
        local.port()
    }));

    let flows = net.flows(closed);
    agent.wait_for(&flows, |r| r.len() >= 3);
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(records.len(), 3, "one record per connect: {records:#?}");
    for r in &records {
        assert_common(r, &host);
        assert_eq!(r.direction, Direction::Outbound, "{r:#?}");
        assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
        assert_eq!((r.bytes_sent, r.bytes_received), (0, 0), "{r:#?}");
        assert_eq!(
            (r.resets_sent, r.resets_received),
            (0, 1),
            "the refusal is a reset received: {r:#?}"
        );
        assert_eq!(r.remote_port, closed, "{r:#?}");
        assert_ne!(r.local_port, 0, "the SYN left from a real port: {r:#?}");
        assert_eq!(r.pid, Some(std::process::id()), "{r:#?}");
        assert_eq!(r.comm.as_deref(), Some("flt-refused"), "{r:#?}");
    }
    for (local, remote) in [
        (net.client_v4, net.server_v4),
        (net.client_v6, net.server_v6),
    ] {
        let n = records
            .iter()
            .filter(|r| r.local_addr == local && r.remote_addr == remote)
            .count();
        let expected = if local.is_ipv4() { 2 } else { 1 };
        assert_eq!(n, expected, "records {local} -> {remote}: {records:#?}");
    }
    one(&records, "the bound connect", |r| {
        r.local_port == bound_port
    });
}

/// A connect to `port` of the server that nothing answers (nftables drops the SYNs), which the
/// kernel gives up after about 3 s (`TCP_SYNCNT` 1). Returns the client's and the server's
/// address and the client's `tcpi_total_retrans` (its SYN retransmits).
fn timed_out_connect(net: &NetnsPair, port: u16, thread: &str) -> (SocketAddr, SocketAddr, u32) {
    net.add_server_input_rule(&format!("tcp dport {port} drop"));
    let addr = SocketAddr::new(net.server_v4, port);
    let (local, retransmits) = join(net.client(thread, move || {
        let socket = start_syn_limited_connect(addr);
        let local = socket.local_addr().unwrap();
        wait_writable(&socket);
        let error = socket.take_error().expect("SO_ERROR");
        assert_eq!(
            error.and_then(|e| e.raw_os_error()),
            Some(libc::ETIMEDOUT),
            "the connect should time out"
        );
        // The socket is closed: its counters are final.
        (local, tcp_info(&socket).tcpi_total_retrans)
    }));
    assert!(retransmits > 0, "the SYN was retransmitted");
    (local, addr, retransmits)
}

/// The reasons of `flowlog_sidecar_kernel_drops_total`, each exported from the first second on.
const KERNEL_DROP_REASONS: [&str; 3] = ["ringbuf_full", "map_full", "skipped_run"];

#[test]
fn timed_out_connect_is_failed() {
    let net = NetnsPair::new(10);
    let port = server_port();
    let agent = Agent::start("timeout", NO_INTERIM);
    let (client, server, retransmits) = timed_out_connect(&net, port, "flt-timeout");

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| !r.is_empty());
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = outbound(&records, client, server);
    assert_common(r, &host);
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    assert_eq!((r.bytes_sent, r.bytes_received), (0, 0), "{r:#?}");
    assert_eq!((r.resets_sent, r.resets_received), (0, 0), "{r:#?}");
    assert_eq!(
        r.retransmits,
        u64::from(retransmits),
        "SYN retransmits vs TCP_INFO: {r:#?}"
    );
    assert_eq!(r.pid, Some(std::process::id()), "{r:#?}");
    assert_eq!(r.comm.as_deref(), Some("flt-timeout"), "{r:#?}");
}

#[test]
fn interim_records_of_a_connect_in_progress_carry_its_port() {
    let net = NetnsPair::new(11);
    let port = server_port();
    let agent = Agent::start("syn-interim", "1s");
    // About 3 s in SYN_SENT: two or three interim records, then the failed end.
    let (client, server, retransmits) = timed_out_connect(&net, port, "flt-syn-sent");

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| r.iter().any(|r| r.outcome != Outcome::Open));
    let host = agent.host.clone();
    let mut records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    records.sort_by_key(|r| r.seq);
    assert!(
        records.len() >= 2,
        "a connect of 3 s with --interim 1s has interim records: {records:#?}"
    );
    let last = records.len() - 1;
    for (i, r) in records.iter().enumerate() {
        assert_common(r, &host);
        assert_eq!(r.flow_id, records[0].flow_id, "one flow: {records:#?}");
        assert_eq!(r.seq as usize, i, "seq without gaps: {records:#?}");
        assert_eq!(r.direction, Direction::Outbound, "{r:#?}");
        let expected = if i == last {
            Outcome::Failed
        } else {
            Outcome::Open
        };
        assert_eq!(r.outcome, expected, "record {i}: {records:#?}");
        assert_eq!(
            (r.local_addr, r.local_port, r.remote_addr, r.remote_port),
            (client.ip(), client.port(), server.ip(), server.port()),
            "4-tuple of record {i} (seq {}, {:?}): {records:#?}",
            r.seq,
            r.outcome
        );
        assert_eq!((r.bytes_sent, r.bytes_received), (0, 0), "{r:#?}");
        assert_eq!(r.comm.as_deref(), Some("flt-syn-sent"), "{r:#?}");
    }
    assert_eq!(
        records.iter().map(|r| r.retransmits).sum::<u64>(),
        u64::from(retransmits),
        "SYN retransmits vs TCP_INFO: {records:#?}"
    );
}

/// Reads once more and expects the peer's reset.
fn expect_reset(s: &mut std::net::TcpStream) {
    let mut rest = [0u8; 1];
    match s.read(&mut rest) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the peer's reset, got {other:?}"),
    }
}

#[test]
fn abortive_close_is_reset_on_both_sides() {
    abortive_close(3, "linger", Access::Default);
}

#[test]
fn abortive_close_is_reset_on_both_sides_with_probe_reads() {
    abortive_close(13, "linger-probe-read", Access::ProbeRead);
}

fn abortive_close(index: u8, test: &str, access: Access) {
    let net = NetnsPair::new(index);
    let port = server_port();
    let mut rng = rng(test);
    // (IPv6?, client aborts?, request, response); both sizes at least one byte (see below).
    let mut flows_spec: Vec<(bool, bool, usize, usize)> = Vec::new();
    for v6 in [false, true] {
        for client_aborts in [false, true] {
            let request = rng.random_range(1..=100_000);
            let response = rng.random_range(1..=100_000);
            flows_spec.push((v6, client_aborts, request, response));
        }
    }
    let data = random_bytes(&mut rng, 100_000);
    let v4_addr = SocketAddr::new(net.server_v4, port);
    let v6_addr = SocketAddr::new(net.server_v6, port);
    let v4 = net.listen(v4_addr);
    let v6 = net.listen(v6_addr);

    let agent = access.start(test);
    // Before either side aborts, all payload is acknowledged both ways, so that `bytes_sent`
    // (acknowledged payload) is exactly what was written: the response's segments carry the
    // acknowledgement of the request, and the server waits until the client has acknowledged
    // the response. Then one side closes with SO_LINGER {on, 0}: a reset.
    let (acked_tx, acked_rx) = std::sync::mpsc::channel::<()>();
    let server = {
        let (spec, data) = (flows_spec.clone(), data.clone());
        net.server("flt-server", move || {
            for &(v6_flow, client_aborts, request, response) in &spec {
                let (mut s, _) = accept(if v6_flow { &v6 } else { &v4 });
                assert_eq!(read_exact(&mut s, request), data[..request]);
                s.write_all(&data[..response])
                    .expect("writing the response");
                wait_acked(&s);
                if client_aborts {
                    acked_tx.send(()).expect("telling the client");
                    expect_reset(&mut s);
                } else {
                    abort(s);
                }
            }
        })
    };
    let client = {
        let (spec, data) = (flows_spec.clone(), data.clone());
        net.client("flt-client", move || {
            let mut tuples = Vec::new();
            for &(v6_flow, client_aborts, request, response) in &spec {
                let mut s = connect(if v6_flow { v6_addr } else { v4_addr });
                tuples.push((s.local_addr().unwrap(), s.peer_addr().unwrap()));
                s.write_all(&data[..request]).expect("writing the request");
                assert_eq!(read_exact(&mut s, response), data[..response]);
                if client_aborts {
                    acked_rx
                        .recv_timeout(PATIENCE)
                        .expect("the server's go-ahead");
                    wait_acked(&s);
                    abort(s);
                } else {
                    expect_reset(&mut s);
                }
            }
            tuples
        })
    };
    let (tuples, ()) = join_both(client, server);

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| r.len() >= 2 * flows_spec.len());
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(records.len(), 2 * flows_spec.len(), "{records:#?}");
    for (&(_, client_aborts, request, response), &(client, server)) in
        flows_spec.iter().zip(&tuples)
    {
        let out = outbound(&records, client, server);
        let inb = inbound(&records, client, server);
        for r in [out, inb] {
            assert_common(r, &host);
            assert_eq!(r.outcome, Outcome::Reset, "{r:#?}");
        }
        let (client_resets, server_resets) = if client_aborts {
            ((1, 0), (0, 1))
        } else {
            ((0, 1), (1, 0))
        };
        assert_eq!(
            (out.resets_sent, out.resets_received),
            client_resets,
            "client's (resets_sent, resets_received), client aborts: {client_aborts}: {out:#?}"
        );
        assert_eq!(
            (inb.resets_sent, inb.resets_received),
            server_resets,
            "server's (resets_sent, resets_received), client aborts: {client_aborts}: {inb:#?}"
        );
        assert_eq!(
            (out.bytes_sent, out.bytes_received),
            (request as u64, response as u64),
            "client's bytes: {out:#?}"
        );
        assert_eq!(
            (inb.bytes_sent, inb.bytes_received),
            (response as u64, request as u64),
            "server's bytes: {inb:#?}"
        );
    }
}

#[test]
fn retransmits_under_random_loss_match_tcp_info() {
    const SIZE: usize = 4 << 20;
    const RESPONSE: usize = 1_000;
    let net = NetnsPair::new(4);
    net.add_random_loss_on_server(5);
    let port = server_port();
    let addr = SocketAddr::new(net.server_v4, port);
    let listener = net.listen(addr);
    let data = random_bytes(&mut rng("loss"), SIZE);

    let agent = Agent::start("loss", NO_INTERIM);
    let server = net.server("flt-server", move || {
        let (mut s, _) = accept(&listener);
        assert_eq!(read_to_end(&mut s).len(), SIZE);
        s.write_all(&[7u8; RESPONSE]).expect("response");
    });
    let client = net.client("flt-client", move || {
        let mut s = connect(addr);
        let tuple = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        s.write_all(&data).expect("writing");
        s.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(read_to_end(&mut s).len(), RESPONSE);
        // The server's FIN has arrived, and with it the acknowledgement of everything the
        // client sent, its FIN included (the server sent its FIN after reading ours): the client
        // has nothing left to retransmit, and its TCP_INFO is final.
        let retransmits = tcp_info(&s).tcpi_total_retrans;
        (tuple, retransmits)
    });
    let (((client, server), retransmits), ()) = join_both(client, server);
    eprintln!("loss: the client retransmitted {retransmits} segments (TCP_INFO)");
    assert!(
        retransmits > 0,
        "5% loss on {SIZE} bytes caused no retransmit"
    );

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| r.len() >= 2);
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(records.len(), 2, "{records:#?}");
    let out = outbound(&records, client, server);
    let inb = inbound(&records, client, server);
    for r in [out, inb] {
        assert_common(r, &host);
        assert_eq!(r.outcome, Outcome::Closed, "{r:#?}");
    }
    assert_eq!(
        out.retransmits,
        u64::from(retransmits),
        "client's retransmits vs TCP_INFO: {out:#?}"
    );
    assert_eq!(
        (out.bytes_sent, out.bytes_received),
        (SIZE as u64, RESPONSE as u64),
        "{out:#?}"
    );
    assert_eq!(
        (inb.bytes_sent, inb.bytes_received),
        (RESPONSE as u64, SIZE as u64),
        "{inb:#?}"
    );
}

#[test]
fn long_lived_flow_gets_interim_records_summing_to_totals() {
    const ROUNDS: usize = 10;
    let net = NetnsPair::new(5);
    let port = server_port();
    let addr = SocketAddr::new(net.server_v6, port);
    let listener = net.listen(addr);
    let mut rng = rng("interim");
    let rounds: Vec<(usize, usize)> = (0..ROUNDS)
        .map(|_| (rng.random_range(1..=50_000), rng.random_range(1..=50_000)))
        .collect();
    let data = random_bytes(&mut rng, 50_000);
    let sent: u64 = rounds.iter().map(|r| r.0 as u64).sum();
    let received: u64 = rounds.iter().map(|r| r.1 as u64).sum();

    let agent = Agent::start("interim", "1s");
    let server = {
        let (rounds, data) = (rounds.clone(), data.clone());
        net.server("flt-server", move || {
            let (mut s, _) = accept(&listener);
            for &(request, response) in &rounds {
                assert_eq!(read_exact(&mut s, request), data[..request]);
                s.write_all(&data[..response]).expect("response");
            }
            assert!(read_to_end(&mut s).is_empty());
        })
    };
    let client = net.client("flt-client", move || {
        let mut s = connect(addr);
        let tuple = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        let started = Instant::now();
        for &(request, response) in &rounds {
            s.write_all(&data[..request]).expect("request");
            assert_eq!(read_exact(&mut s, response), data[..response]);
            thread::sleep(Duration::from_millis(400));
        }
        // Open across at least three interim periods of 1 s.
        assert!(started.elapsed() >= Duration::from_millis(3_500));
        s.shutdown(Shutdown::Write).expect("shutdown");
        assert!(read_to_end(&mut s).is_empty());
        tuple
    });
    let ((client, server), ()) = join_both(client, server);

    let flows = net.flows(port);
    let done = |r: &[FlowRecord]| r.iter().filter(|r| r.outcome != Outcome::Open).count() >= 2;
    agent.wait_for(&flows, done);
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    for (direction, (exp_sent, exp_received)) in [
        (Direction::Outbound, (sent, received)),
        (Direction::Inbound, (received, sent)),
    ] {
        let mut side: Vec<&FlowRecord> = records
            .iter()
            .filter(|r| r.direction == direction)
            .collect();
        side.sort_by_key(|r| r.seq);
        assert!(
            side.len() >= 3,
            "{direction:?}: {} records over ~4 s with --interim 1s: {side:#?}",
            side.len()
        );
        let flow_id = side[0].flow_id;
        for (i, r) in side.iter().enumerate() {
            assert_common(r, &host);
            assert_eq!(r.flow_id, flow_id, "one flow id per socket: {side:#?}");
            assert_eq!(r.seq as usize, i, "seq without gaps: {side:#?}");
            assert_eq!(r.start_ns, side[0].start_ns, "one start time: {side:#?}");
            let last = i == side.len() - 1;
            let expected = if last { Outcome::Closed } else { Outcome::Open };
            assert_eq!(r.outcome, expected, "{side:#?}");
            if i > 0 {
                assert!(r.end_ns >= side[i - 1].end_ns, "report times: {side:#?}");
            }
            let (local, remote) = if direction == Direction::Outbound {
                (client, server)
            } else {
                (server, client)
            };
            assert_eq!(
                (r.local_addr, r.local_port, r.remote_addr, r.remote_port),
                (local.ip(), local.port(), remote.ip(), remote.port()),
                "4-tuple of record {i}: {side:#?}"
            );
        }
        let sum = |f: fn(&FlowRecord) -> u64| side.iter().map(|r| f(r)).sum::<u64>();
        assert_eq!(
            (sum(|r| r.bytes_sent), sum(|r| r.bytes_received)),
            (exp_sent, exp_received),
            "{direction:?}: deltas must sum to the bytes written and read: {side:#?}"
        );
        assert!(
            side[..side.len() - 1].iter().any(|r| r.bytes_sent > 0),
            "interim records carry traffic: {side:#?}"
        );
    }
}

#[test]
fn a_thousand_short_connections_give_two_thousand_records_and_no_drop() {
    const CONNECTIONS: usize = 1_000;
    const REQUEST: usize = 100;
    const RESPONSE: usize = 200;
    let net = NetnsPair::new(6);
    let port = server_port();
    let v4_addr = SocketAddr::new(net.server_v4, port);
    let v6_addr = SocketAddr::new(net.server_v6, port);
    let v4 = net.listen(v4_addr);
    let v6 = net.listen(v6_addr);

    let agent = Agent::start("thousand", NO_INTERIM);
    let server = net.server("flt-server", move || {
        for i in 0..CONNECTIONS {
            let (mut s, _) = accept(if i % 2 == 1 { &v6 } else { &v4 });
            read_exact(&mut s, REQUEST);
            s.write_all(&[1u8; RESPONSE]).expect("response");
            assert!(read_to_end(&mut s).is_empty());
        }
    });
    let client = net.client("flt-client", move || {
        (0..CONNECTIONS)
            .map(|i| {
                let mut s = connect(if i % 2 == 1 { v6_addr } else { v4_addr });
                s.write_all(&[2u8; REQUEST]).expect("request");
                read_exact(&mut s, RESPONSE);
                (s.local_addr().unwrap(), s.peer_addr().unwrap())
            })
            .collect::<Vec<_>>()
    });
    let (tuples, ()) = join_both(client, server);
    let traffic_done = Instant::now();

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| r.len() >= 2 * CONNECTIONS);
    // Kernel drop counters are exported once a second: read a page from after the traffic.
    let deadline = Instant::now() + PATIENCE;
    let page = loop {
        let page = agent.metrics();
        let exported = KERNEL_DROP_REASONS.iter().all(|reason| {
            let sample = format!("flowlog_sidecar_kernel_drops_total{{reason=\"{reason}\"}}");
            Agent::metric(&page, &sample).is_some()
        });
        if exported && traffic_done.elapsed() > Duration::from_millis(1_500) {
            break page;
        }
        assert!(Instant::now() < deadline, "no drop counters in:\n{page}");
        thread::sleep(Duration::from_millis(100));
    };
    for reason in KERNEL_DROP_REASONS {
        let sample = format!("flowlog_sidecar_kernel_drops_total{{reason=\"{reason}\"}}");
        assert_eq!(
            Agent::metric(&page, &sample),
            Some(0.0),
            "{sample}:\n{page}"
        );
    }
    // No flow was taken for one whose end went unseen, nor lost track of.
    for sample in [
        "flowlog_sidecar_missed_ends_total",
        "flowlog_sidecar_recovered_ends_total",
        "flowlog_sidecar_vanished_flows_total",
    ] {
        assert_eq!(Agent::metric(&page, sample), Some(0.0), "{sample}:\n{page}");
    }
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(records.len(), 2 * CONNECTIONS, "records of the traffic");
    let keys: HashSet<(u64, u32)> = records.iter().map(|r| (r.flow_id, r.seq)).collect();
    assert_eq!(keys.len(), records.len(), "duplicate (flow_id, seq)");
    let by_tuple: HashMap<(Direction, SocketAddr, SocketAddr), &FlowRecord> = records
        .iter()
        .map(|r| {
            (
                (
                    r.direction,
                    SocketAddr::new(r.local_addr, r.local_port),
                    SocketAddr::new(r.remote_addr, r.remote_port),
                ),
                r,
            )
        })
        .collect();
    assert_eq!(by_tuple.len(), records.len(), "two records of one end");
    for &(client, server) in &tuples {
        let out = by_tuple
            .get(&(Direction::Outbound, client, server))
            .unwrap_or_else(|| panic!("no outbound record of {client} -> {server}"));
        let inb = by_tuple
            .get(&(Direction::Inbound, server, client))
            .unwrap_or_else(|| panic!("no inbound record of {client} -> {server}"));
        for r in [out, inb] {
            assert_common(r, &host);
            assert_eq!(r.outcome, Outcome::Closed, "{r:#?}");
        }
        assert_eq!(
            (out.bytes_sent, out.bytes_received),
            (REQUEST as u64, RESPONSE as u64),
            "{out:#?}"
        );
        assert_eq!(
            (inb.bytes_sent, inb.bytes_received),
            (RESPONSE as u64, REQUEST as u64),
            "{inb:#?}"
        );
    }
}

#[test]
fn pid_comm_and_cgroup_are_those_of_the_connecting_thread() {
    process(7, "process", Access::Default);
}

#[test]
fn pid_comm_and_cgroup_are_those_of_the_connecting_thread_with_probe_reads() {
    process(14, "process-probe-read", Access::ProbeRead);
}

fn process(index: u8, test: &str, access: Access) {
    let net = NetnsPair::new(index);
    let port = server_port();
    let v4_addr = SocketAddr::new(net.server_v4, port);
    let v6_addr = SocketAddr::new(net.server_v6, port);
    let v4 = net.listen(v4_addr);
    let v6 = net.listen(v6_addr);

    let agent = access.start(test);
    // One thread accepts, another one talks and closes: the record names the one that accepted
    // (the accept program saw it), not the one that closed.
    let server = net.server("flt-acceptor", move || {
        let streams: Vec<_> = [&v4, &v6].into_iter().map(|l| accept(l).0).collect();
        let closer = thread::Builder::new()
            .name("flt-closer".into())
            .spawn(move || {
                for mut s in streams {
                    assert_eq!(read_to_end(&mut s), b"hello");
                    s.write_all(b"bye").expect("response");
                }
            })
            .expect("spawning the closer");
        join(closer);
    });
    // One thread connects, another one talks and closes: the record names the one that connected.
    let client = net.client("flt-connector", move || {
        let streams: Vec<_> = [v4_addr, v6_addr].into_iter().map(connect).collect();
        let tuples: Vec<_> = streams
            .iter()
            .map(|s| (s.local_addr().unwrap(), s.peer_addr().unwrap()))
            .collect();
        let talker = thread::Builder::new()
            .name("flt-talker".into())
            .spawn(move || {
                for mut s in streams {
                    s.write_all(b"hello").expect("request");
                    s.shutdown(Shutdown::Write).expect("shutdown");
                    assert_eq!(read_to_end(&mut s), b"bye");
                }
            })
            .expect("spawning the talker");
        join(talker);
        tuples
    });
    let (tuples, ()) = join_both(client, server);

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| r.len() >= 4);
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(records.len(), 4, "{records:#?}");
    let cgroup = own_cgroup_id();
    for &(client, server) in &tuples {
        let out = outbound(&records, client, server);
        assert_eq!(out.pid, Some(std::process::id()), "pid: {out:#?}");
        assert_eq!(out.comm.as_deref(), Some("flt-connector"), "comm: {out:#?}");
        match cgroup {
            Some(id) => assert_eq!(out.cgroup_id, Some(id), "cgroup: {out:#?}"),
            None => assert!(out.cgroup_id.is_some(), "cgroup: {out:#?}"),
        }
        let inb = inbound(&records, client, server);
        assert_eq!(inb.pid, Some(std::process::id()), "pid: {inb:#?}");
        assert_eq!(inb.comm.as_deref(), Some("flt-acceptor"), "comm: {inb:#?}");
        assert_eq!(inb.cgroup_id, out.cgroup_id, "cgroup: {inb:#?}");
        assert_eq!((out.bytes_sent, out.bytes_received), (5, 3), "{out:#?}");
        assert_eq!((inb.bytes_sent, inb.bytes_received), (3, 5), "{inb:#?}");
    }
}

#[test]
fn open_flows_are_flushed_on_shutdown() {
    let net = NetnsPair::new(8);
    let port = server_port();
    let addr = SocketAddr::new(net.server_v4, port);
    let listener = net.listen(addr);
    let mut rng = rng("flush");
    let (request, response) = (rng.random_range(1..=200_000), rng.random_range(1..=200_000));
    let data = random_bytes(&mut rng, 200_000);

    let agent = Agent::start("flush", NO_INTERIM);
    let server = {
        let data = data.clone();
        net.server("flt-server", move || {
            let (mut s, _) = accept(&listener);
            assert_eq!(read_exact(&mut s, request), data[..request]);
            s.write_all(&data[..response]).expect("response");
            wait_acked(&s);
            s
        })
    };
    let client = net.client("flt-client", move || {
        let mut s = connect(addr);
        s.write_all(&data[..request]).expect("request");
        assert_eq!(read_exact(&mut s, response), data[..response]);
        wait_acked(&s);
        s
    });
    // Both sockets stay open (held here) while the agent stops.
    let (client_stream, server_stream) = join_both(client, server);
    let (client, server) = (
        client_stream.local_addr().unwrap(),
        client_stream.peer_addr().unwrap(),
    );

    let flows = net.flows(port);
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    drop((client_stream, server_stream));
    assert_eq!(records.len(), 2, "{records:#?}");
    let out = outbound(&records, client, server);
    let inb = inbound(&records, client, server);
    for r in [out, inb] {
        assert_common(r, &host);
        assert_eq!(r.outcome, Outcome::Open, "{r:#?}");
        assert_eq!(r.seq, 0, "{r:#?}");
    }
    assert_eq!(
        (out.bytes_sent, out.bytes_received),
        (request as u64, response as u64),
        "{out:#?}"
    );
    assert_eq!(
        (inb.bytes_sent, inb.bytes_received),
        (response as u64, request as u64),
        "{inb:#?}"
    );
}

#[test]
fn ipv4_mapped_ipv6_socket_reports_ipv4() {
    let net = NetnsPair::new(9);
    let port = server_port();
    // A dual-stack listener (IPV6_V6ONLY is off by default): IPv4 clients land on an AF_INET6
    // socket with IPv4-mapped addresses.
    let listener = net.listen(SocketAddr::new("::".parse().unwrap(), port));
    let addr = SocketAddr::new(net.server_v4, port);

    let agent = Agent::start("mapped", NO_INTERIM);
    let server = net.server("flt-server", move || {
        let (mut s, peer) = accept(&listener);
        assert_eq!(read_to_end(&mut s).len(), 1234);
        s.write_all(&[0u8; 4321]).expect("response");
        peer
    });
    let client = net.client("flt-client", move || {
        let mut s = connect(addr);
        let tuple = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        s.write_all(&[0u8; 1234]).expect("request");
        s.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(read_to_end(&mut s).len(), 4321);
        tuple
    });
    let ((client, server), peer) = join_both(client, server);
    assert!(
        matches!(peer, SocketAddr::V6(p) if p.ip().to_ipv4_mapped().is_some()),
        "the server saw {peer}"
    );

    let flows = net.flows(port);
    agent.wait_for(&flows, |r| r.len() >= 2);
    let host = agent.host.clone();
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    assert_eq!(records.len(), 2, "{records:#?}");
    let inb = inbound(&records, client, server);
    let out = outbound(&records, client, server);
    for r in [out, inb] {
        assert_common(r, &host);
        assert_eq!(r.family, Family::Ipv4, "{r:#?}");
        assert_eq!(r.outcome, Outcome::Closed, "{r:#?}");
    }
    assert_eq!(
        (inb.bytes_sent, inb.bytes_received),
        (4321, 1234),
        "{inb:#?}"
    );
    assert_eq!(
        (out.bytes_sent, out.bytes_received),
        (1234, 4321),
        "{out:#?}"
    );
}

/// Runs the agent with `args` (never reaching the kernel) and returns (exit code, stderr).
fn agent_usage(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(AGENT)
        .args(args)
        .env_remove("FLOWLOG_OUTPUT")
        .env_remove("FLOWLOG_INTERIM")
        .env_remove("FLOWLOG_RING_BUFFER_BYTES")
        .stdin(Stdio::null())
        .output()
        .expect("running the agent");
    assert!(out.stdout.is_empty(), "usage errors go to stderr");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_command_lines_are_usage_errors() {
    let (code, stderr) = agent_usage(&["--no-such-flag"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
    assert!(stderr.contains("Usage:"), "{stderr}");

    let (code, stderr) = agent_usage(&["--output", "bogus"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--output"), "{stderr}");
    assert!(stderr.contains("`bogus` is not an output"), "{stderr}");

    let (code, stderr) = agent_usage(&["--output", "file:"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not an output"), "{stderr}");

    let (code, stderr) = agent_usage(&["--interim", "0s"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--interim"), "{stderr}");

    let (code, stderr) = agent_usage(&["--ring-buffer-bytes", "1000"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("power of two"), "{stderr}");
}
