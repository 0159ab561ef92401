//! Bad conditions: a kernel (or a view of one) without what the agent needs, a process without
//! the capabilities to load programs, a burst that overflows the kernel ring buffer, and a flow map
//! too small for the open sockets. Each must end in a clear error or a counted, logged condition,
//! never a crash or a silent loss.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use flowlog_common::BATCH_LEN;
use flowlog_sidecar::record::{FlowRecord, Outcome};
use flowlog_testkit::{free_port, temp_dir};

const BIN: &str = env!("CARGO_BIN_EXE_flowlog-sidecar");

/// Runs the agent to completion with `args`; returns (exit code, stderr).
fn run_to_exit(prefix: &[&str], args: &[&str]) -> (i32, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let (program, rest) = match prefix.split_first() {
        Some((p, rest)) => (*p, rest.to_vec()),
        None => (BIN, Vec::new()),
    };
    let mut cmd = Command::new(program);
    cmd.args(rest);
    if !prefix.is_empty() {
        cmd.arg(BIN);
    }
    let out = cmd
        .args(["--metrics-addr", &metrics, "--pin-dir", ""])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running flowlog-sidecar");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_btf_is_a_clear_start_up_error() {
    let (code, stderr) = run_to_exit(&[], &["--btf", "/etc/hostname"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("exposes no usable BTF at /etc/hostname") && stderr.contains("bad magic"),
        "{stderr}"
    );
}

/// A BTF blob that parses but describes almost nothing: one `int`.
fn minimal_btf() -> Vec<u8> {
    let strings = b"\0int\0";
    // struct btf_type { name_off, info (kind INT = 1 << 24), size } + the INT's encoding word.
    let types: Vec<u8> = [1u32, 1 << 24, 4, 32]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let mut blob = Vec::new();
    blob.extend(0xeb9fu16.to_ne_bytes()); // magic
    blob.extend([1u8, 0]); // version, flags
    for v in [
        24u32,
        0,
        types.len() as u32,
        types.len() as u32,
        strings.len() as u32,
    ] {
        blob.extend(v.to_ne_bytes()); // hdr_len, type_off, type_len, str_off, str_len
    }
    blob.extend(types);
    blob.extend(strings);
    blob
}

#[test]
fn missing_tracepoint_is_named() {
    let dir = temp_dir("no-tracepoint");
    let btf = dir.join("vmlinux");
    std::fs::write(&btf, minimal_btf()).unwrap();
    let (code, stderr) = run_to_exit(&[], &["--btf", btf.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "has no tracepoint sock:inet_sock_set_state (its BTF has no \
             `btf_trace_inet_sock_set_state`)"
        ),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Without the accept tracepoints (a tracefs copy whose accept formats lack `ret`), the agent
/// says so once and runs on; an inbound flow then gets its process when it is closed.
#[test]
fn missing_accept_tracepoint_field_degrades_to_process_at_close() {
    let real = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("events/syscalls").is_dir())
        .expect("tracefs is mounted (scripts/bootstrap mounts it)");
    let dir = temp_dir("no-field");
    for tp in ["syscalls/sys_exit_accept4", "syscalls/sys_exit_accept"] {
        let format = std::fs::read_to_string(real.join("events").join(tp).join("format")).unwrap();
        let format: String = format
            .lines()
            .filter(|l| !l.contains(" ret;"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::create_dir_all(dir.join("events").join(tp)).unwrap();
        std::fs::write(dir.join("events").join(tp).join("format"), format).unwrap();
    }
    let tracefs = dir.to_str().unwrap().to_string();
    let mut agent = Agent::start("no-accept", &["--tracefs", &tracefs]);
    agent.wait_for_log("accepted sockets cannot be traced", Duration::from_secs(5));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = serve(listener, 1);
    let client_port = exchange(port);
    server.join().unwrap();
    let (records, log) = agent.stop();
    let warning = log
        .iter()
        .find(|l| l.contains("accepted sockets cannot be traced"))
        .unwrap();
    assert!(
        warning.contains("has no field `ret`") && warning.contains("sys_exit_accept4"),
        "{warning}"
    );
    let inbound: Vec<_> = records
        .iter()
        .filter(|r| r.local_port == port && r.remote_port == client_port)
        .collect();
    assert_eq!(inbound.len(), 1, "{records:#?}");
    assert_eq!(
        inbound[0].pid,
        Some(std::process::id()),
        "{:#?}",
        inbound[0]
    );
    assert_eq!((inbound[0].bytes_sent, inbound[0].bytes_received), (4, 4));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_capabilities_are_named() {
    // Root, but without the capabilities that loading eBPF needs.
    let (code, stderr) = run_to_exit(
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-perfmon,-sys_admin",
            "--inh-caps",
            "-all",
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    // Named by the first operation the kernel refuses (creating the maps), both at once.
    assert!(
        stderr.contains("creating the eBPF maps in kernel ")
            && stderr.contains(
                ", which the kernel refused: this process lacks CAP_BPF, which the agent needs \
                 to create its eBPF maps and load its eBPF programs, and also CAP_PERFMON, which \
                 the agent needs"
            ),
        "{stderr}"
    );
}

/// An agent whose stderr lines are collected in the background.
struct Agent {
    child: Child,
    stderr: mpsc::Receiver<String>,
    log: Vec<String>,
    output: PathBuf,
    metrics: String,
}

impl Agent {
    fn start(tag: &str, args: &[&str]) -> Agent {
        let dir = temp_dir(tag);
        let output = dir.join("flows.jsonl");
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(BIN)
            .args(["--output", &format!("file:{}", output.display())])
            .args(["--metrics-addr", &metrics, "--pin-dir", ""])
            .args(args)
            .env("FLOWLOG_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting flowlog-sidecar");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            child,
            stderr: rx,
            log: Vec::new(),
            output,
            metrics,
        };
        agent.wait_for_log("capturing TCP flows", Duration::from_secs(30));
        agent
    }

    /// Whether the agent has logged `needle`, waiting up to `timeout` for it.
    fn logged(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(line) = self.stderr.try_recv() {
                self.log.push(line);
            }
            if self.log.iter().any(|l| l.contains(needle)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                // The agent exited: nothing more will come.
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        assert!(
            self.logged(needle, timeout),
            "agent never logged `{needle}`; log:\n{}",
            self.log.join("\n")
        );
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Value of one metric sample from the agent's /metrics page.
    fn metric(&self, series: &str) -> f64 {
        let mut stream = TcpStream::connect(&self.metrics).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).unwrap();
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample `{series}` in:\n{page}"))
    }

    /// SIGTERM, wait for a clean exit, return the records and the whole log.
    fn stop(mut self) -> (Vec<FlowRecord>, Vec<String>) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().unwrap();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            self.log.push(line);
        }
        assert!(
            status.success(),
            "agent exited {status}; log:\n{}",
            self.log.join("\n")
        );
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let records = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a flow record"))
            .collect();
        (records, self.log)
    }
}

/// One request/response connection on loopback; returns the client's port.
fn exchange(port: u16) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    s.local_addr().unwrap().port()
}

fn serve(listener: TcpListener, connections: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..connections {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            s.write_all(b"pong").unwrap();
        }
    })
}

/// The agent is stopped (SIGSTOP) while 100 connections close, so the 4 KiB ring buffer (room
/// for about 29 records) overflows. The loss is counted and logged once, the agent carries on and
/// records the next connection.
#[test]
fn ring_buffer_overflow_is_counted_logged_once_and_survived() {
    let mut agent = Agent::start(
        "overflow",
        &["--ring-buffer-bytes", "4096", "--drain-interval", "50ms"],
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = serve(listener, 101);

    agent.signal(libc::SIGSTOP);
    for _ in 0..100 {
        exchange(port);
    }
    agent.signal(libc::SIGCONT);
    agent.wait_for_log("kernel ring buffer overflowed", Duration::from_secs(10));
    let drops = agent.metric("flowlog_sidecar_kernel_drops_total{reason=\"ringbuf_full\"}");

    let after = exchange(port);
    server.join().unwrap();
    std::thread::sleep(Duration::from_millis(800)); // drain + reset grace
    let (records, log) = agent.stop();

    let ours: Vec<&FlowRecord> = records
        .iter()
        .filter(|r| r.local_port == port || r.remote_port == port)
        .collect();
    // 101 connections = 202 flows. A record is 136 bytes, and every ring buffer entry (one record,
    // or a CPU's batch of up to BATCH_LEN) has an 8-byte header: at most 29 fit in 4 KiB (three
    // full batches and five single records). Besides those, each CPU may still hold up to
    // BATCH_LEN - 1 records in its batch when the agent resumes, and flushes them then.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let room = 29 + (BATCH_LEN - 1) * cpus;
    let burst = ours.len() - 2;
    assert!(
        burst <= room,
        "{burst} burst records survived a 4 KiB ring and {cpus} CPU batches"
    );
    assert!(
        drops >= (200 - burst) as f64,
        "{drops} drops counted for {} lost records",
        200 - burst
    );
    let overflow_warnings = log
        .iter()
        .filter(|l| l.contains("kernel ring buffer overflowed"))
        .count();
    assert_eq!(overflow_warnings, 1, "log:\n{}", log.join("\n"));
    // The connection after the overflow is recorded on both ends, exactly.
    let outbound: Vec<_> = ours.iter().filter(|r| r.local_port == after).collect();
    let inbound: Vec<_> = ours.iter().filter(|r| r.remote_port == after).collect();
    assert_eq!((outbound.len(), inbound.len()), (1, 1), "{ours:#?}");
    assert_eq!((outbound[0].bytes_sent, outbound[0].bytes_received), (4, 4));
    assert_eq!((inbound[0].bytes_sent, inbound[0].bytes_received), (4, 4));
}

/// A flow map of 64 entries and connections held open in waves of 40 (80 sockets, more than the
/// map holds): each wave's flows get their interim records, then the next wave's sockets make
/// the kernel's LRU map evict. An evicted flow gets no snapshot again and its close is untracked:
/// the agent must count it, log it once and forget it, and write nothing more for it (no record
/// restarting at `seq` 0), while the flows that stayed in the map end with exact records.
#[test]
fn flows_evicted_from_a_full_map_vanish_counted_and_logged_once() {
    const WAVE: usize = 40;
    const WAVES: usize = 6;
    const VANISHED_LOG: &str = "left the kernel flow map without an end";
    let mut agent = Agent::start("evicted", &["--max-flows", "64", "--interim", "1s"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Serves connections until the client side is done, keeping every one open.
    let server = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_err() || &buf == b"stop" {
                break;
            }
            s.write_all(b"pong").unwrap();
            held.push(s);
        }
        held
    });
    let open = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.write_all(b"ping").unwrap();
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).unwrap();
                s
            })
            .collect()
    };
    let ours = |r: &FlowRecord| r.local_port == port || r.remote_port == port;

    let mut held = Vec::new();
    let mut waves = 0;
    while waves < WAVES && !agent.logged(VANISHED_LOG, Duration::ZERO) {
        held.extend(open(WAVE));
        waves += 1;
        // Interim records for this wave (1 s), and a wave evicted earlier forgotten (3 s).
        agent.logged(VANISHED_LOG, Duration::from_millis(2_500));
    }
    assert!(
        agent.logged(VANISHED_LOG, Duration::from_secs(5)),
        "no flow vanished after {waves} waves; log:\n{}",
        agent.log.join("\n")
    );
    // Any new socket on the host (a metrics scrape too) may evict another flow: close ours,
    // then give every evicted one three interim periods and a scan to be forgotten.
    drop(held);
    let mut stop = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stop.write_all(b"stop").unwrap();
    let stop_port = stop.local_addr().unwrap().port();
    drop(stop);
    drop(server.join().unwrap());
    std::thread::sleep(Duration::from_secs(5));
    let vanished = agent.metric("flowlog_sidecar_vanished_flows_total");
    // An evicted flow never has another event; a live flow taken for vanished would (its end).
    let ignored = agent.metric("flowlog_sidecar_vanished_events_total");
    let (records, log) = agent.stop();
    assert_eq!(ignored, 0.0, "events of flows wrongly forgotten");

    let mut flows: std::collections::HashMap<u64, Vec<&FlowRecord>> = Default::default();
    for r in records.iter().filter(|r| ours(r)) {
        flows.entry(r.flow_id).or_default().push(r);
    }
    // Every connection closed before the agent stopped, so a flow whose records are all
    // interim ones (`open`) was evicted after being reported.
    let evicted_reported = flows
        .values()
        .filter(|rs| rs.iter().all(|r| r.outcome == Outcome::Open))
        .count();
    assert!(
        evicted_reported > 0,
        "no flow of ours was evicted after its interim record"
    );
    assert!(
        vanished >= evicted_reported as f64,
        "{vanished} vanished counted, {evicted_reported} of ours were reported then evicted"
    );
    for (flow_id, rs) in &flows {
        // One record per seq, from 0, none after the flow vanished: no restart at seq 0.
        let mut seqs: Vec<u32> = rs.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (0..rs.len() as u32).collect::<Vec<_>>(),
            "flow {flow_id}: {rs:#?}"
        );
        // Flows that stayed tracked end with their exact totals: 4 bytes each way, but for the
        // stop connection's 4 bytes one way, unanswered.
        if let Some(end) = rs.iter().find(|r| r.outcome != Outcome::Open) {
            let sent: u64 = rs.iter().map(|r| r.bytes_sent).sum();
            let received: u64 = rs.iter().map(|r| r.bytes_received).sum();
            let expected = match (end.local_port == stop_port, end.remote_port == stop_port) {
                (true, _) => (4, 0),
                (_, true) => (0, 4),
                _ => (4, 4),
            };
            assert_eq!((sent, received), expected, "flow {flow_id}: {end:#?}");
        }
    }
    let warnings = log.iter().filter(|l| l.contains(VANISHED_LOG)).count();
    assert_eq!(warnings, 1, "log:\n{}", log.join("\n"));
}
