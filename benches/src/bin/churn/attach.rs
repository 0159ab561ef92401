//! The tracers under test, each started as a child process: `flowlog-sidecar` and, as the
//! reference point, a tcplife-style `bpftrace` script. Both write their records to a file in the
//! work directory, so both pay for formatting and writing every record; neither writes to a
//! terminal.
use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

/// tcplife from tracepoints only (this kernel has no kprobes): start time, pid and comm when a
/// socket starts (SYN_SENT on the connect side, LISTEN→SYN_RECV for an accepted child); at
/// TCP_CLOSE, one line with pid, addresses, ports, payload bytes acked/received read from
/// `struct tcp_sock` through BTF (as bcc's tcplife does), duration in µs and comm. comm goes last
/// because it may hold spaces.
pub const TCPLIFE_BT: &str = r#"
tracepoint:sock:inet_sock_set_state
/args->protocol == 6/
{
  $sk = args->skaddr;
  if (args->newstate == 2 || (args->oldstate == 10 && args->newstate == 3)) {
    @start[$sk] = nsecs;
    @pid[$sk] = pid;
    @comm[$sk] = comm;
  }
  if (args->newstate == 7 && @start[$sk] != 0) {
    $tp = (struct tcp_sock *)$sk;
    if (args->family == 2) {
      printf("%d %s:%d %s:%d %lu %lu %lu %s\n", @pid[$sk],
             ntop(args->saddr), args->sport, ntop(args->daddr), args->dport,
             $tp->bytes_acked, $tp->bytes_received, (nsecs - @start[$sk]) / 1000, @comm[$sk]);
    } else {
      printf("%d %s:%d %s:%d %lu %lu %lu %s\n", @pid[$sk],
             ntop(args->saddr_v6), args->sport, ntop(args->daddr_v6), args->dport,
             $tp->bytes_acked, $tp->bytes_received, (nsecs - @start[$sk]) / 1000, @comm[$sk]);
    }
    delete(@start[$sk]);
    delete(@pid[$sk]);
    delete(@comm[$sk]);
  }
}

END
{
  clear(@start);
  clear(@pid);
  clear(@comm);
}
"#;

/// How long a tracer may take to load and attach its programs.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a tracer may take to flush and exit after its signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Which tracer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracer {
    Sidecar,
    Bpftrace,
}

/// A running tracer: its process, the file its records go to, its log, and (sidecar) its
/// metrics address.
pub struct Attached {
    tracer: Tracer,
    child: Child,
    output: PathBuf,
    log: PathBuf,
    metrics_addr: Option<SocketAddr>,
}

impl Attached {
    /// Starts `flowlog-sidecar` writing to a file in `dir`, with its metrics on a free loopback
    /// port, and waits until it logs "capturing TCP flows".
    pub fn sidecar(bin: &Path, dir: &Path, tag: &str) -> anyhow::Result<Self> {
        let output = dir.join(format!("{tag}.jsonl"));
        let to = format!("file:{}", output.display());
        Self::sidecar_with(bin, dir, tag, &["--output".into(), to], output)
    }

    /// The sidecar with `args` choosing its output (e.g. `--output kafka --brokers ...`);
    /// `output` is the file [`Attached::stop`] returns (none need exist for Kafka).
    pub fn sidecar_with(
        bin: &Path,
        dir: &Path,
        tag: &str,
        args: &[String],
        output: PathBuf,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{tag}.log"));
        let metrics_addr = free_loopback_port()?;
        let child = Command::new(bin)
            // Unpinned: a benchmark's agent leaves nothing attached behind it.
            .args(["--pin-dir", ""])
            .args(args)
            .arg("--metrics-addr")
            .arg(metrics_addr.to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut me = Self {
            tracer: Tracer::Sidecar,
            child,
            output,
            log,
            metrics_addr: Some(metrics_addr),
        };
        let log = me.log.clone();
        me.wait_for(&log, "capturing TCP flows")?;
        Ok(me)
    }

    /// Starts `bpftrace -o <file> <script>` and waits until it prints "Attaching" (into the
    /// output file, where `-o` sends it).
    pub fn bpftrace(bin: &Path, script: &Path, dir: &Path, tag: &str) -> anyhow::Result<Self> {
        let output = dir.join(format!("{tag}.txt"));
        let log = dir.join(format!("{tag}.log"));
        let child = Command::new(bin)
            .arg("-o")
            .arg(&output)
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut me = Self {
            tracer: Tracer::Bpftrace,
            child,
            output,
            log,
            metrics_addr: None,
        };
        let output = me.output.clone();
        me.wait_for(&output, "Attaching")?;
        Ok(me)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `file` for `marker`; fails if the tracer exits or takes too long.
    fn wait_for(&mut self, file: &Path, marker: &str) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if fs::read_to_string(file).is_ok_and(|text| text.contains(marker)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("checking on the tracer")? {
                bail!(
                    "{:?} exited ({status}) before printing `{marker}`; its log:\n{}",
                    self.tracer,
                    self.log_text()
                );
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "{:?} did not print `{marker}` within {READY_TIMEOUT:?}; its log:\n{}",
                    self.tracer,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(unreadable: {e})"))
    }

    /// GETs the sidecar's `/metrics` page (plain HTTP/1.0, so the body is not chunked).
    pub fn scrape_metrics(&self) -> anyhow::Result<String> {
        let addr = self
            .metrics_addr
            .ok_or_else(|| anyhow!("{:?} has no metrics endpoint", self.tracer))?;
        let mut stream =
            TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .with_context(|| format!("sending GET /metrics to {addr}"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .with_context(|| format!("reading /metrics from {addr}"))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
        let status = head.lines().next().unwrap_or_default();
        if !status.contains(" 200") {
            bail!("GET http://{addr}/metrics: {status}");
        }
        Ok(body.to_string())
    }

    /// Stops the tracer the way an operator would (SIGTERM for the sidecar, which then flushes;
    /// SIGINT for bpftrace, which then runs END), waits for it, and returns its output file.
    pub fn stop(mut self) -> anyhow::Result<PathBuf> {
        let signal = match self.tracer {
            Tracer::Sidecar => libc::SIGTERM,
            Tracer::Bpftrace => libc::SIGINT,
        };
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signalling {:?} (pid {pid})", self.tracer));
        }
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the tracer")? {
                if !status.success() && self.tracer == Tracer::Sidecar {
                    bail!(
                        "{:?} exited with {status}; its log:\n{}",
                        self.tracer,
                        self.log_text()
                    );
                }
                return Ok(self.output.clone());
            }
            if start.elapsed() > STOP_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{:?} did not exit within {STOP_TIMEOUT:?}", self.tracer);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Attached {
    /// On an error path, never leave a tracer attached.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn log_file(path: &Path) -> anyhow::Result<File> {
    File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// A loopback port that was free a moment ago.
fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port on 127.0.0.1")?;
    listener.local_addr().context("reading a bound address")
}
