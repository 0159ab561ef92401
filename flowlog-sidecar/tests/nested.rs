//! State changes made by a softirq that interrupts the state-change program on its CPU. The
//! kernel does not re-enter a program that is already running there, so such a change is skipped
//! for it: 60 of 2,000 SYN timeouts under a connect/close churn were lost that way when this was
//! first measured. Here the timeouts (timer softirq) fire while both CPUs churn loopback
//! connections (the program in process context), and each failed connect is closed at once. The
//! agent must show that ends were written at the socket's destruction (`tcp:tcp_destroy_sock`)
//! for interrupted changes, and every timed-out connect must have its exact `failed` record,
//! whichever of the state-change program, the destruction program or the sweep wrote it. Some
//! ends reach no state-change program at all: in about one run in four, the kernel runs it for
//! none of a whole softirq's batch of timeouts (11–26 of them) and counts no skipped run either
//! (see `flowlog-ebpf`'s `destroy` module); those are written at the destruction too.
//! A test binary of its own: the churn would slow every test running beside it.
mod support;

use std::{
    collections::HashMap,
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use flowlog_sidecar::record::{FlowRecord, Outcome};
use support::{Agent, NetnsPair, PATIENCE, join, server_port, start_syn_limited_connect};

/// Connects per round whose SYNs go unanswered, one every [`SPACING`].
const TIMEOUTS: usize = 1_000;
const SPACING: Duration = Duration::from_millis(2);
/// A connect with `TCP_SYNCNT` 1 gives up after about 3 s (SYN at 0 s, retransmit at 1 s).
const SYN_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the connecting thread looks for failed connects to close.
const CLOSE_POLL: Duration = Duration::from_millis(5);
/// Rounds tried until the destruction program has written an end record. The timers expire in
/// batches (about 15 at a time), so a round offers a few dozen chances for a softirq to land in
/// the state-change program, and about one round in three has none: 4 rounds failed about once
/// in 60 runs, 8 should fail about once in 5,000.
const MAX_ROUNDS: usize = 8;

/// Connect/close churn on 127.0.0.1, one client and one server thread pinned to each CPU, until
/// `stop` is set (the server closes first, so TIME_WAIT ties up no client port). Returns the
/// threads (each returns its connections) and the listeners' addresses.
fn churn(stop: &Arc<AtomicBool>) -> (Vec<thread::JoinHandle<u64>>, Vec<SocketAddr>) {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = Vec::new();
    let mut addrs = Vec::new();
    for cpu in 0..cpus {
        let listener = TcpListener::bind("127.0.0.1:0").expect("churn listener");
        let addr = listener.local_addr().unwrap();
        addrs.push(addr);
        let server_stop = Arc::clone(stop);
        threads.push(thread::spawn(move || {
            pin_to(cpu);
            let mut accepted = 0;
            // Woken by one last connection once `stop` is set.
            while let Ok((stream, _)) = listener.accept() {
                drop(stream);
                if server_stop.load(Ordering::Relaxed) {
                    break;
                }
                accepted += 1;
            }
            accepted
        }));
        let client_stop = Arc::clone(stop);
        threads.push(thread::spawn(move || {
            pin_to(cpu);
            let mut connected = 0;
            let mut eof = [0u8; 1];
            while !client_stop.load(Ordering::Relaxed) {
                if let Ok(mut stream) = TcpStream::connect(addr) {
                    let _ = stream.read(&mut eof);
                    connected += 1;
                }
            }
            connected
        }));
    }
    (threads, addrs)
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_setaffinity(0, ..) applies to the
    // calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Starts [`TIMEOUTS`] non-blocking connects from the client namespace to `addr`, whose SYNs the
/// server drops, one every [`SPACING`], and closes each one as soon as its connect has failed
/// (within [`CLOSE_POLL`]), so that its socket is destroyed then: an end the state-change
/// program was skipped for is written at that destruction, or by the sweep if it comes first.
/// The thread returns the connects' local ports once all of them are closed.
fn unanswered_connects(net: &NetnsPair, addr: SocketAddr) -> thread::JoinHandle<Vec<u16>> {
    net.client("flt-nested", move || {
        let mut open: Vec<TcpStream> = Vec::with_capacity(TIMEOUTS);
        let mut ports = Vec::with_capacity(TIMEOUTS);
        let close_failed = |open: &mut Vec<TcpStream>| {
            open.retain(|socket| matches!(socket.take_error(), Ok(None)));
        };
        for _ in 0..TIMEOUTS {
            let socket = start_syn_limited_connect(addr);
            ports.push(socket.local_addr().unwrap().port());
            open.push(socket);
            thread::sleep(SPACING);
        }
        let deadline = Instant::now() + SYN_TIMEOUT + PATIENCE;
        while !open.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} connects still pending {:?} after the last",
                open.len(),
                SYN_TIMEOUT + PATIENCE
            );
            close_failed(&mut open);
            thread::sleep(CLOSE_POLL);
        }
        ports
    })
}

#[test]
fn state_changes_interrupting_the_program_are_caught() {
    let net = NetnsPair::new(1);
    let port = server_port();
    net.add_server_input_rule(&format!("tcp dport {port} drop"));
    let server = SocketAddr::new(net.server_v4, port);
    // The churn threads busy both CPUs and starve the agent for moments: a ring buffer big
    // enough for a whole round's records (128 MiB, ~900k), so that none is lost to overflow.
    let agent = Agent::start_with(
        "nested",
        &["--interim", "1s", "--ring-buffer-bytes", "134217728"],
    );
    let metric = |sample: &str| {
        Agent::metric(&agent.metrics(), sample)
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{}", agent.metrics()))
    };

    let mut ports = Vec::new();
    let mut rounds = 0;
    let mut churned = 0;
    while rounds < MAX_ROUNDS {
        rounds += 1;
        let started = Instant::now();
        let connects = unanswered_connects(&net, server);
        // The churn runs only while the connects time out: every connection it makes is a
        // record the agent writes (~150 MB a round), and a slow disk must not stall the agent.
        let until =
            |t: Duration| thread::sleep((started + t).saturating_duration_since(Instant::now()));
        until(SYN_TIMEOUT - Duration::from_millis(300));
        let stop = Arc::new(AtomicBool::new(false));
        let (load, listeners) = churn(&stop);
        until(SPACING * TIMEOUTS as u32 + SYN_TIMEOUT + Duration::from_millis(500));
        let round_ports = join(connects);
        stop.store(true, Ordering::Relaxed);
        for addr in listeners {
            let _ = TcpStream::connect(addr);
        }
        churned += load.into_iter().map(join).sum::<u64>() / 2;
        ports.extend(round_ports);
        // The agent exports its counters once a second.
        thread::sleep(Duration::from_millis(1_200));
        if metric("flowlog_sidecar_caught_ends_total") > 0.0 {
            break;
        }
    }
    let caught = metric("flowlog_sidecar_caught_state_changes_total");
    let caught_ends = metric("flowlog_sidecar_caught_ends_total");
    assert!(
        caught_ends > 0.0,
        "the destruction program wrote no end record in {rounds} rounds of {TIMEOUTS} timeouts \
         under a churn of {churned} connections ({caught} interrupted state changes caught)"
    );

    let flows = net.flows(port);
    // Twice the usual patience: the agent may still be writing the churn's records.
    let deadline = Instant::now() + 2 * PATIENCE;
    loop {
        let failed = metric("flowlog_sidecar_records_total{outcome=\"failed\"}");
        if failed >= ports.len() as f64 {
            break;
        }
        let overflowed = metric("flowlog_sidecar_kernel_drops_total{reason=\"ringbuf_full\"}");
        assert_eq!(overflowed, 0.0, "records lost to a full ring buffer");
        assert!(
            Instant::now() < deadline,
            "{failed} failed records for {} timed-out connects after {:?} ({caught} interrupted \
             state changes caught); metrics:\n{}",
            ports.len(),
            2 * PATIENCE,
            agent.metrics()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let lost = metric("flowlog_sidecar_kernel_drops_total{reason=\"skipped_run\"}");
    let recovered = metric("flowlog_sidecar_recovered_ends_total");
    let missed = metric("flowlog_sidecar_missed_ends_total");
    let records: Vec<FlowRecord> = agent.stop().into_iter().filter(&flows).collect();
    eprintln!(
        "{rounds} rounds: {} timed-out connects under a churn of {churned} connections; \
         {caught} interrupted state changes caught, {caught_ends} ends written at the socket's \
         destruction, {recovered} by the sweep, {missed} missed ends, {lost} skipped runs lost",
        ports.len()
    );
    // A local port can come back in a later round: counted per port.
    let mut expected: HashMap<u16, usize> = HashMap::new();
    for &port in &ports {
        *expected.entry(port).or_default() += 1;
    }
    // With `--interim 1s` a connect gets interim (`open`) records before it times out: the
    // flow's records together must be exact, whichever program, or the sweep, wrote its end.
    let mut by_flow: HashMap<u64, Vec<&FlowRecord>> = HashMap::new();
    for r in &records {
        by_flow.entry(r.flow_id).or_default().push(r);
    }
    let mut failed: HashMap<u16, usize> = HashMap::new();
    for flow in by_flow.values() {
        let ends: Vec<_> = flow.iter().filter(|r| r.outcome != Outcome::Open).collect();
        assert_eq!(ends.len(), 1, "one end record per flow: {flow:#?}");
        let end = ends[0];
        assert_eq!(end.outcome, Outcome::Failed, "{end:#?}");
        let sum = |f: fn(&FlowRecord) -> u64| flow.iter().map(|r| f(r)).sum::<u64>();
        assert_eq!(
            (sum(|r| r.bytes_sent), sum(|r| r.bytes_received)),
            (0, 0),
            "{flow:#?}"
        );
        assert_eq!(
            (sum(|r| r.resets_sent), sum(|r| r.resets_received)),
            (0, 0),
            "{flow:#?}"
        );
        // Every segment after the first SYN is a retransmitted SYN (one or two with
        // `TCP_SYNCNT` 1, as the timer falls).
        let segs = sum(|r| r.segs_sent);
        assert!((2..=3).contains(&segs), "SYNs sent: {flow:#?}");
        assert_eq!(sum(|r| r.retransmits), segs - 1, "{flow:#?}");
        assert_eq!(sum(|r| r.segs_received), 0, "{flow:#?}");
        assert_eq!(end.pid, Some(std::process::id()), "{end:#?}");
        assert_eq!(end.comm.as_deref(), Some("flt-nested"), "{end:#?}");
        *failed.entry(end.local_port).or_default() += 1;
    }
    assert_eq!(failed, expected, "one failed record per timed-out connect");
    assert_eq!(lost, 0.0, "skipped runs lost");
}
