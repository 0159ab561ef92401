//! One `flowlog-enricher` process as an operator runs it (the release binary, its own flags),
//! optionally pinned to one CPU with `taskset`, watched through its `/metrics` page and
//! `/proc/<pid>/stat` (CPU of all its threads, librdkafka's included).
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::procfs;

/// A running enricher.
pub struct Replica {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
    ticks_per_second: f64,
}

/// What one enricher of a benchmark reads and writes: `flows.raw` → `flows.enriched` (and a
/// dead-letter topic) in its own consumer group, the static inventory, Parquet into a directory.
pub struct Pipeline<'a> {
    pub brokers: &'a str,
    pub input: &'a str,
    pub output: &'a str,
    pub dlq: &'a str,
    pub group: String,
    pub static_file: &'a Path,
    pub parquet: PathBuf,
}

impl Pipeline<'_> {
    /// The enricher's command-line arguments for it.
    pub fn args(&self) -> Vec<String> {
        [
            ("--brokers", self.brokers.to_owned()),
            ("--input-topic", self.input.to_owned()),
            ("--output-topic", self.output.to_owned()),
            ("--dlq-topic", self.dlq.to_owned()),
            ("--group", self.group.clone()),
            ("--static", self.static_file.display().to_string()),
            ("--parquet", self.parquet.display().to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }
}

impl Replica {
    /// Starts `bin` with `args` (plus its metrics address), on CPU `cpu` if given; waits until
    /// its metrics page answers.
    pub fn start(
        bin: &Path,
        args: &[String],
        cpu: Option<usize>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let metrics = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
            l.local_addr()?
        };
        let mut command = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .args(args)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).with_context(|| format!("creating {}", log.display()))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut replica = Self {
            child,
            metrics,
            log: log.to_owned(),
            ticks_per_second: procfs::clock_ticks_per_second()? as f64,
        };
        let start = Instant::now();
        while replica.scrape().is_err() {
            replica.check_alive()?;
            if start.elapsed() > Duration::from_secs(60) {
                bail!("{} did not serve /metrics within 60 s", bin.display());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(replica)
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the enricher exited ({status}); its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// CPU time of the process so far (all threads), seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        Ok(procfs::cpu_ticks(self.child.id())? as f64 / self.ticks_per_second)
    }

    /// CPU time of the process's librdkafka threads so far, seconds.
    pub fn librdkafka_seconds(&self) -> anyhow::Result<f64> {
        Ok(procfs::librdkafka_ticks(Some(self.child.id()))? as f64 / self.ticks_per_second)
    }

    /// The `/metrics` page.
    pub fn scrape(&self) -> anyhow::Result<String> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            bail!("GET /metrics: {status}");
        }
        Ok(body)
    }

    /// GETs `path` from the metrics listener (HTTP/1.0: the body is not chunked).
    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect(self.metrics)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed response from {}", self.metrics))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no status in the response from {}", self.metrics))?;
        Ok((status, body.to_string()))
    }

    /// Waits until `/readyz` answers 200 (partitions assigned, inventory caught up).
    pub fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = self.get("/readyz") {
                return Ok(());
            }
            self.check_alive()?;
            if start.elapsed() > limit {
                bail!(
                    "the enricher was not ready within {limit:?}: {:?}",
                    self.get("/readyz")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The sum of a metric's samples whose line starts with `prefix` (a name, or a name and
    /// the start of its labels).
    pub fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        Ok(sum(&self.scrape()?, prefix))
    }

    /// Polls every 20 ms until `metric` reaches `value`; returns when it did.
    pub fn wait_for(&mut self, metric: &str, value: f64, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.metric(metric)? < value {
            self.check_alive()?;
            if start.elapsed() > limit {
                bail!(
                    "{metric} = {} after {limit:?}, waiting for {value}",
                    self.metric(metric)?
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGTERM (the enricher then closes its Parquet files and commits) and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "the enricher exited with {status}; its log:\n{}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the enricher did not stop within 60 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The sum of the samples of `page` whose line starts with `prefix`.
pub fn sum(page: &str, prefix: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
