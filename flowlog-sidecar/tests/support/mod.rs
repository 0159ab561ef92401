//! Fixtures for the capture tests: two network namespaces joined by a veth pair and threads that
//! run socket code inside one of them (`flowlog_testkit::netns`), the agent as a child process,
//! and socket facts read back from the kernel (TCP_INFO, the send queue) to compare the agent's
//! records with.
//!
//! The agent sees every TCP flow of the host, and tests run in parallel, each with its own agent
//! and its own namespaces: every test has its own index, which gives it its own addresses
//! (198.51.100.4n/30, 2001:db8:n::/64) and namespace names (with the process id in them).
#![allow(dead_code)] // each test binary uses a different part of the support module

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use flowlog_sidecar::record::FlowRecord;
/// The namespaces, and the commands and threads that work in them, are shared with the other
/// crates' tests.
#[allow(unused_imports)] // not every test binary uses them
pub use flowlog_testkit::netns::*;

/// How long a fixture waits for something that should happen (agent start, records, peers).
/// Generous: the machine has two cores and the tests run in parallel.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Read/write timeout on every test socket, so a test whose peer died fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's binary, built by cargo for these tests.
pub const AGENT: &str = env!("CARGO_BIN_EXE_flowlog-sidecar");

/// Joins two threads (a client and a server); if either panicked, panics with both messages, so
/// that the peer's error does not hide the cause.
pub fn join_both<A, B>(a: JoinHandle<A>, b: JoinHandle<B>) -> (A, B) {
    let message = |e: Box<dyn std::any::Any + Send>| -> String {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(non-string panic)".to_string())
    };
    match (a.join(), b.join()) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            let a = a.err().map(message);
            let b = b.err().map(message);
            panic!("thread panicked: first: {a:?}; second: {b:?}")
        }
    }
}

/// Accepts one connection, failing after [`PATIENCE`]. The accepted socket gets [`IO_TIMEOUT`].
pub fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that we own.
    let rc = unsafe { libc::poll(&mut fds, 1, PATIENCE.as_millis() as libc::c_int) };
    assert!(
        rc > 0,
        "no connection to accept within {PATIENCE:?} (poll: {rc})"
    );
    let (stream, peer) = listener.accept().expect("accept");
    with_timeouts(&stream);
    (stream, peer)
}

/// Connects (from the calling thread, so inside its namespace) with [`IO_TIMEOUT`] set.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, PATIENCE)
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    with_timeouts(&stream);
    stream
}

fn with_timeouts(stream: &TcpStream) {
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// Reads exactly `n` bytes.
pub fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// Reads until the peer's FIN; returns what was read.
pub fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    stream
        .read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("reading to the end: {e}"));
    buf
}

/// `TCP_INFO` of a socket, as the kernel reports it.
pub fn tcp_info(socket: &impl AsRawFd) -> libc::tcp_info {
    // SAFETY: tcp_info is plain integers; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info
}

/// A new, unconnected IPv4 TCP socket, held as a `TcpStream` (std has no unconnected sockets)
/// so that `local_addr`, `take_error` and `set_nonblocking` work on it.
pub fn ipv4_socket() -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: socket() has no preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    unsafe { TcpStream::from_raw_fd(fd) }
}

fn sockaddr_in(addr: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(addr) = addr else {
        panic!("{addr} is not an IPv4 address")
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// `bind()` of an [`ipv4_socket`].
pub fn bind_v4(socket: &TcpStream, addr: SocketAddr) {
    let sa = sockaddr_in(addr);
    // SAFETY: bind reads one sockaddr_in that we own.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
}

/// `connect()` of an [`ipv4_socket`] (blocking or not, as the socket is).
pub fn connect_v4(socket: &TcpStream, addr: SocketAddr) -> std::io::Result<()> {
    let sa = sockaddr_in(addr);
    // SAFETY: connect reads one sockaddr_in that we own.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets `TCP_SYNCNT`: how many times the kernel retransmits a SYN before a connect times out.
pub fn set_syn_count(socket: &impl AsRawFd, count: libc::c_int) {
    // SAFETY: setsockopt reads one int that we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&count as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_SYNCNT: {}", std::io::Error::last_os_error());
}

/// Starts a non-blocking connect of a new IPv4 socket to `addr` with `TCP_SYNCNT` 1, so that if
/// nothing answers the SYN the kernel gives up after about 3 s (SYN at 0 s, retransmit at 1 s).
/// Call it in the namespace to connect from; connect() has chosen the local port on return.
pub fn start_syn_limited_connect(addr: SocketAddr) -> TcpStream {
    let socket = ipv4_socket();
    set_syn_count(&socket, 1);
    socket.set_nonblocking(true).expect("non-blocking");
    match connect_v4(&socket, addr) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        other => panic!("non-blocking connect: {other:?}"),
    }
    socket
}

/// Waits until a socket is writable (a non-blocking connect has finished, one way or the other).
pub fn wait_writable(socket: &impl AsRawFd) {
    let mut fds = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd that we own.
    let rc = unsafe { libc::poll(&mut fds, 1, PATIENCE.as_millis() as libc::c_int) };
    assert!(
        rc > 0,
        "socket not writable within {PATIENCE:?} (poll: {rc})"
    );
}

/// Bytes written to the socket that the peer has not acknowledged yet (`SIOCOUTQ`).
pub fn unacked_bytes(stream: &TcpStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(rc, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n
}

/// Waits until the peer has acknowledged everything written so far, so that `bytes_sent`
/// (acknowledged payload) in a record taken now is the number of bytes written.
pub fn wait_acked(stream: &TcpStream) {
    let deadline = Instant::now() + PATIENCE;
    while unacked_bytes(stream) != 0 {
        assert!(
            Instant::now() < deadline,
            "peer did not acknowledge {} bytes within {PATIENCE:?}",
            unacked_bytes(stream)
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// The cgroup v2 id of this process (the inode number of its cgroup directory), if cgroup v2 is
/// mounted; this is what `bpf_get_current_cgroup_id` reports.
pub fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        (after.split_whitespace().next() == Some("cgroup2"))
            .then(|| before.split_whitespace().nth(4).map(str::to_string))?
    })?;
    let dir = format!("{mount}{path}");
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// The socket-read path the agent must choose on this machine: `FLOWLOG_TEST_READ_PATH` if set
/// (`probe_read` for a kernel known to refuse BTF-typed tracepoints), else `tp_btf`, which this
/// project's kernels (6.18) allow. So an agent that falls back to probe reads where it need not
/// fails the tests instead of passing on the slower path.
pub fn expected_read_path() -> String {
    std::env::var("FLOWLOG_TEST_READ_PATH").unwrap_or_else(|_| "tp_btf".to_string())
}

/// A port nobody else on the machine is likely to use for these tests' servers (tests run in
/// their own namespaces, but another run of the agent's tests may share the addresses).
pub fn server_port() -> u16 {
    20_000 + (std::process::id() % 20_000) as u16
}

/// A free TCP port on loopback, for the agent's metrics listener.
fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral loopback port")
        .port()
}

/// The agent running as a child process, writing JSON lines to a file of its own.
pub struct Agent {
    child: Option<Child>,
    pub output: PathBuf,
    pub metrics_addr: SocketAddr,
    pub host: String,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts the agent with `--interim interim` and waits until it has attached.
    pub fn start(test: &str, interim: &str) -> Self {
        Self::start_with(test, &["--interim", interim])
    }

    /// Starts the agent with extra arguments and waits until it logs that it is capturing.
    pub fn start_with(test: &str, extra: &[&str]) -> Self {
        Self::start_run(test, test, extra)
    }

    /// [`Agent::start_with`] for one of several agents of a test that run one after the other:
    /// each writes its own file (named after `run`), all with the host name of `test`.
    pub fn start_run(test: &str, run: &str, extra: &[&str]) -> Self {
        let pid = std::process::id();
        let output = std::env::temp_dir().join(format!("flowlog-test-{pid}-{run}.jsonl"));
        let _ = std::fs::remove_file(&output);
        let metrics_addr: SocketAddr = ([127, 0, 0, 1], free_loopback_port()).into();
        let host = format!("test-{test}");
        let mut child = Command::new(AGENT)
            .arg("--output")
            .arg(format!("file:{}", output.display()))
            .args(["--metrics-addr", &metrics_addr.to_string()])
            .args(["--host", &host])
            // Unpinned unless the test pins (in a directory of its own): agents of tests that
            // run in parallel must not share, or wait for, the default pin directory.
            .args(if extra.contains(&"--pin-dir") {
                &[][..]
            } else {
                &["--pin-dir", ""][..]
            })
            .args(extra)
            .env_remove("FLOWLOG_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {AGENT}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        {
            let pipe = child.stderr.take().expect("stderr is piped");
            let stderr = Arc::clone(&stderr);
            thread::Builder::new()
                .name("agent-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(pipe).lines() {
                        let Ok(line) = line else { break };
                        let ready = line.contains("capturing TCP flows");
                        {
                            let mut s = stderr.lock().unwrap_or_else(|e| e.into_inner());
                            s.push_str(&line);
                            s.push('\n');
                        }
                        if ready {
                            let _ = ready_tx.send(());
                        }
                    }
                })
                .expect("spawning the stderr reader");
        }
        let mut agent = Self {
            child: Some(child),
            output,
            metrics_addr,
            host,
            stderr,
        };
        if let Err(e) = ready_rx.recv_timeout(PATIENCE) {
            let status = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            panic!(
                "the agent did not log `capturing TCP flows` ({e}; exit status {status:?}); \
                 stderr:\n{}",
                agent.stderr()
            );
        }
        agent
    }

    /// What the agent has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records written so far (complete lines only).
    pub fn records(&self) -> Vec<FlowRecord> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("record `{line}` does not parse: {e}"))
            })
            .collect()
    }

    /// Polls the output until `done` holds for the records selected by `select`; returns them.
    pub fn wait_for(
        &self,
        select: impl Fn(&FlowRecord) -> bool,
        done: impl Fn(&[FlowRecord]) -> bool,
    ) -> Vec<FlowRecord> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let records: Vec<FlowRecord> = self.records().into_iter().filter(&select).collect();
            if done(&records) {
                return records;
            }
            if Instant::now() > deadline {
                panic!(
                    "records did not arrive within {PATIENCE:?}; have {}: {records:#?}\nagent \
                     stderr:\n{}\nkernel drops:\n{}",
                    records.len(),
                    self.stderr(),
                    self.drops()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's Prometheus metrics page.
    pub fn metrics(&self) -> String {
        self.try_metrics()
            .unwrap_or_else(|e| panic!("reading the agent's metrics: {e}"))
    }

    fn try_metrics(&self) -> Result<String, String> {
        match self.get("/metrics")? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("request failed: {status} {body}")),
        }
    }

    /// One GET of `path` on the agent's metrics listener: the status code and the body.
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        flowlog_testkit::http_get(self.metrics_addr, path)
            .map_err(|e| format!("GET {path} on {}: {e}", self.metrics_addr))
    }

    /// The agent's kernel drop counters, for failure messages: the agent sees every flow of the
    /// host, so another process making connections very fast (a benchmark) can overflow it.
    fn drops(&self) -> String {
        match self.try_metrics() {
            Ok(page) => page
                .lines()
                .filter(|l| l.starts_with("flowlog_sidecar_kernel_drops_total"))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("(metrics unavailable: {e})"),
        }
    }

    /// Value of one sample (`name{labels}` exactly as exposed) on the metrics page, if present.
    pub fn metric(page: &str, sample: &str) -> Option<f64> {
        page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// The socket-read path the agent chose at start, from its `flowlog_sidecar_read_path`
    /// gauge (the one `path` at 1; exactly one must be, and the log must name the same).
    pub fn read_path(&self) -> String {
        let page = self.metrics();
        let chosen: Vec<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("flowlog_sidecar_read_path{path=\""))
            .filter_map(|l| l.split_once("\"} "))
            .filter(|(_, value)| value.trim() == "1")
            .map(|(path, _)| path)
            .collect();
        assert_eq!(
            chosen.len(),
            1,
            "expected one flowlog_sidecar_read_path at 1, found {chosen:?}; metrics:\n{page}"
        );
        let logged = format!("read_path=\"{}\"", chosen[0]);
        assert!(
            self.stderr().contains(&logged),
            "the metric says {} but the log does not say {logged}:\n{}",
            chosen[0],
            self.stderr()
        );
        chosen[0].to_string()
    }

    /// Sends SIGTERM, waits for a clean exit (status 0) and returns every record written.
    pub fn stop(mut self) -> Vec<FlowRecord> {
        let status = self.terminate();
        assert!(
            status.success(),
            "the agent exited with {status} after SIGTERM; stderr:\n{}",
            self.stderr()
        );
        let stderr = self.stderr();
        if stderr.contains("ring buffer overflowed") || stderr.contains("flow map full") {
            eprintln!(
                "NOTE: agent `{}` lost data in the kernel while this test ran (it sees every \
                 flow of the host: is something else making connections very fast?); a failure \
                 below may come from that. Its stderr:\n{stderr}",
                self.host
            );
        }
        self.records()
    }

    /// SIGKILL (no chance to flush anything), waits for the exit and returns every record
    /// written.
    pub fn kill(mut self) -> Vec<FlowRecord> {
        let mut child = self.child.take().expect("the agent runs");
        child.kill().expect("killing the agent");
        child.wait().expect("waiting for the agent");
        self.records()
    }

    /// SIGTERM, then waits for the exit (SIGKILL after [`PATIENCE`]).
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent runs");
        // SAFETY: kill on the pid of our own child, which we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the agent") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not exit within {PATIENCE:?} of SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Kept for a failed test, unless it is huge (every flow of a busy host).
        const KEEP_AT_MOST: u64 = 16 << 20;
        let size = std::fs::metadata(&self.output).map_or(0, |m| m.len());
        let keep = thread::panicking() && size <= KEEP_AT_MOST;
        if thread::panicking() {
            eprintln!(
                "agent output ({size} bytes) {} {}; agent stderr:\n{}",
                if keep { "kept at" } else { "deleted:" },
                self.output.display(),
                self.stderr()
            );
        }
        if !keep {
            let _ = std::fs::remove_file(&self.output);
        }
    }
}
