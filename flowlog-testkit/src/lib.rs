//! Scaffolding shared by flowlog's integration tests (a dev-dependency only): a Kafka topic of
//! a test's own on the real broker (`FLOWLOG_TEST_KAFKA`, started by `scripts/kafka start`),
//! reading a topic back, pyarrow's view of Parquet output, the shipped SQL reports in DuckDB and
//! chDB (on Parquet, and through ClickHouse's Kafka engine), fresh temp directories, child
//! processes killed on drop, a Kubernetes list/watch API server ([`kubernetes`]), pod address
//! churn with its ground truth ([`pod_churn`]), a private broker behind TLS and SASL
//! ([`tls::TlsBroker`]), pages rendered by headless Chromium ([`chromium`]) and the binaries of
//! other packages of the workspace ([`cargo_bin()`]). The benchmarks under `benches/` use it too.
pub mod broker;
mod cargo_bin;
pub mod chromium;
pub mod kubernetes;
pub mod netns;
pub mod pod_churn;
pub mod tls;

use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    message::OwnedMessage,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

/// How long tests wait for anything that should happen (records arriving, a process starting).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The test broker (`FLOWLOG_TEST_KAFKA`, default 127.0.0.1:9092).
pub fn brokers() -> String {
    std::env::var("FLOWLOG_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_string())
}

/// A current-thread tokio runtime, for the admin client's futures.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// An admin client of `brokers`.
pub fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    admin_with(brokers, &[])
}

/// An admin client of `brokers` with librdkafka `options` (TLS, SASL, ...).
pub fn admin_with(
    brokers: &str,
    options: &[(String, String)],
) -> AdminClient<DefaultClientContext> {
    client_config(brokers, options)
        .create()
        .expect("creating the Kafka admin client")
}

/// A client configuration: `bootstrap.servers`, then `options`.
pub fn client_config(brokers: &str, options: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in options {
        config.set(k, v);
    }
    config
}

pub use cargo_bin::cargo_bin;
/// Now, in ns since the Unix epoch (the clock flow records and ownership intervals use).
pub use flowlog_identity::now_ns;

/// A name no other test or run uses: `flowlog-test-<what>-<pid>-<ns>`.
pub fn unique_name(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("flowlog-test-{what}-{}-{nanos}", std::process::id())
}

/// A topic of one test's own (its name is unique to the test run).
///
/// Never deleted: tansu 0.6, the test broker, panics in its storage actor on a fetch for a topic
/// that is gone ("more or less than one row") — a consumer being torn down may still have one
/// in flight — and fails every request after that until it restarts, failing every test still
/// to run. `scripts/test` starts the broker on a fresh database instead (`scripts/kafka fresh`),
/// so test topics do not pile up from one run to the next.
pub struct Topic {
    pub name: String,
    pub brokers: String,
    /// librdkafka options of every client the topic makes (TLS, SASL, ...).
    pub options: Vec<(String, String)>,
}

impl Topic {
    /// Creates `flowlog-test-<test>-…` with `partitions` on the test broker and waits until its
    /// metadata shows them.
    pub fn create(test: &str, partitions: i32) -> Self {
        Self::create_on(&brokers(), test, partitions)
    }

    pub fn create_on(brokers: &str, test: &str, partitions: i32) -> Self {
        Self::create_with(brokers, &[], test, partitions)
    }

    /// [`Topic::create_on`] a broker whose clients need librdkafka `client_options`.
    pub fn create_with(
        brokers: &str,
        client_options: &[(String, String)],
        test: &str,
        partitions: i32,
    ) -> Self {
        let name = unique_name(test);
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let client = admin_with(brokers, client_options);
        // A broker busy with other clients' work may time out a creation: asked again.
        let mut attempt = 0;
        let results = loop {
            attempt += 1;
            match runtime().block_on(client.create_topics(
                &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
                &options,
            )) {
                Ok(results) => break results,
                Err(e) if attempt < 3 => eprintln!("creating topic {name}: {e}; trying again"),
                Err(e) => panic!(
                    "creating topic {name} on {brokers} (is the broker running? `scripts/kafka start`): {e}"
                ),
            }
        };
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
        // The broker may answer the creation before its metadata shows the topic.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = client
                .inner()
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .is_ok_and(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == name
                            && t.error().is_none()
                            && t.partitions().len() == partitions as usize
                    })
                });
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "topic {name} did not appear in the metadata"
            );
            thread::sleep(Duration::from_millis(50));
        }
        Self {
            name,
            brokers: brokers.to_string(),
            options: client_options.to_vec(),
        }
    }

    /// A configuration for a client of the topic's broker: `bootstrap.servers` and the
    /// topic's options.
    pub fn client_config(&self) -> ClientConfig {
        client_config(&self.brokers, &self.options)
    }

    /// Produces `(key, payload)` messages to the topic, in order, and waits until all are
    /// delivered (panics after [`PATIENCE`]).
    pub fn produce(&self, messages: &[(Vec<u8>, Vec<u8>)]) {
        let producer: ThreadedProducer<DefaultProducerContext> = self
            .client_config()
            .set("linger.ms", "5")
            .create()
            .expect("creating the test producer");
        for (key, payload) in messages {
            producer
                .send(BaseRecord::to(&self.name).key(key).payload(payload))
                .map_err(|(e, _)| e)
                .expect("queueing a test message");
        }
        producer
            .flush(PATIENCE)
            .expect("delivering the test messages");
    }

    /// Reads the topic from the beginning (every partition) until `done` says the messages
    /// read so far are enough; panics after [`PATIENCE`].
    pub fn read_until(&self, done: impl Fn(&[OwnedMessage]) -> bool) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("creating the consumer");
        let mut assignment = TopicPartitionList::new();
        for p in self.partitions(&consumer) {
            assignment
                .add_partition_offset(&self.name, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).expect("assigning partitions");
        let mut messages = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        // `done` may look at every message: ask it when the topic is idle or every 1,000
        // messages, not after each one.
        let mut idle = true;
        loop {
            if (idle || messages.len() % 1000 == 0) && done(&messages) {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "messages did not arrive in {} within {PATIENCE:?}; have {}",
                self.name,
                messages.len()
            );
            idle = false;
            match consumer.poll(Duration::from_millis(100)) {
                None => idle = true,
                Some(Ok(message)) => messages.push(message.detach()),
                // A broker that has just restarted may answer with transient errors.
                Some(Err(e)) => eprintln!("consumer error (retried): {e}"),
            }
        }
    }

    /// Every message the topic holds now: reads each partition up to its high watermark as
    /// of this call (offsets may have gaps, e.g. after compaction).
    pub fn read_all(&self) -> Vec<OwnedMessage> {
        let probe: BaseConsumer = self
            .client_config()
            .create()
            .expect("creating the consumer");
        let ends: Vec<(i32, i64)> = self
            .partitions(&probe)
            .into_iter()
            .map(|p| {
                let (low, high) = probe
                    .fetch_watermarks(&self.name, p, Duration::from_secs(10))
                    .expect("reading the partition's watermarks");
                (p, if high > low { high - 1 } else { -1 })
            })
            .collect();
        self.read_until(|messages| {
            ends.iter().all(|&(p, last)| {
                last < 0
                    || messages
                        .iter()
                        .any(|m| m.partition() == p && m.offset() >= last)
            })
        })
    }

    /// The topic's partition ids. tansu's metadata may briefly show a topic without its
    /// partitions while other topics are created or deleted: asked again until they appear.
    fn partitions(&self, consumer: &BaseConsumer) -> Vec<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(metadata) = consumer.fetch_metadata(Some(&self.name), Duration::from_secs(10))
                && let Some(topic) = metadata.topics().iter().find(|t| t.name() == self.name)
                && !topic.partitions().is_empty()
            {
                return topic.partitions().iter().map(|p| p.id()).collect();
            }
            assert!(
                Instant::now() < deadline,
                "topic {} has no partitions in the metadata",
                self.name
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The committed offsets of `group` on this topic, by partition (`None`: nothing committed).
    pub fn committed(&self, group: &str) -> Vec<Option<i64>> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", group)
            .create()
            .expect("creating the consumer");
        let mut list = TopicPartitionList::new();
        for p in self.partitions(&consumer) {
            list.add_partition(&self.name, p);
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .expect("committed offsets");
        let mut out: Vec<(i32, Option<i64>)> = committed
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset().to_raw()))
            .collect();
        out.sort_unstable();
        out.into_iter()
            .map(|(_, o)| o.filter(|&o| o >= 0))
            .collect()
    }
}

/// The payloads of `messages`, for comparing what a topic holds.
pub fn payloads(messages: &[OwnedMessage]) -> Vec<&[u8]> {
    messages.iter().filter_map(Message::payload).collect()
}

/// pyarrow's reading of flowlog's Parquet output (a reader nobody here wrote): see the script's
/// docstring for its commands. `scripts/bootstrap` installs pyarrow and boto3.
pub const PARQUET_READER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/parquet_reader.py");

/// Runs [`PARQUET_READER`] with `args` and returns its stdout (JSON for `read`).
pub fn pyarrow(args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg(PARQUET_READER)
        .args(args)
        .output()
        .expect("running python3 (scripts/bootstrap installs pyarrow and boto3)");
    assert!(
        out.status.success(),
        "{PARQUET_READER} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs one of the shipped ClickHouse reports (`analysis/clickhouse/<name>.sql`, after
/// `views.sql`) in chDB, an embedded ClickHouse, on the Parquet files matching `data`, with the
/// other query parameters `vars` (`NAME=VALUE`), and returns its rows.
pub fn chdb(name: &str, data: &str, vars: &[&str]) -> serde_json::Value {
    shipped_report("chdb", "clickhouse", name, data, vars)
}

/// Runs one of the shipped DuckDB reports (`analysis/duckdb/<name>.sql`, after `views.sql`) on
/// the Parquet files matching `data`, with the other DuckDB variables `vars` (`NAME=VALUE`), and
/// returns its rows.
pub fn duckdb(name: &str, data: &str, vars: &[&str]) -> serde_json::Value {
    shipped_report("duckdb", "duckdb", name, data, vars)
}

/// `flowlog-testkit/sql_report.py` with `engine` on `analysis/<dir>/views.sql` and
/// `analysis/<dir>/<name>.sql` (`scripts/bootstrap` installs duckdb and chdb).
fn shipped_report(
    engine: &str,
    dir: &str,
    name: &str,
    data: &str,
    vars: &[&str],
) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sql_report.py");
    let dir = format!("{}/../analysis/{dir}", env!("CARGO_MANIFEST_DIR"));
    let views = format!("{dir}/views.sql");
    let sql = format!("{dir}/{name}.sql");
    let out = std::process::Command::new("python3")
        .args([script, engine, &views, &sql, data])
        .args(vars)
        .output()
        .unwrap_or_else(|e| panic!("running python3 for {engine}: {e}"));
    assert!(
        out.status.success(),
        "{sql} on {data} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the rows as JSON")
}

/// The Python with the chDB whose Kafka engine works (`FLOWLOG_CHDB_KAFKA_PYTHON`; by default
/// that of the virtualenv `scripts/bootstrap` makes, `$FLOWLOG_CACHE/chdb-kafka`, the cache being
/// `$HOME/.cache/flowlog` unless set).
pub fn chdb_kafka_python() -> String {
    std::env::var("FLOWLOG_CHDB_KAFKA_PYTHON").unwrap_or_else(|_| {
        let cache = std::env::var("FLOWLOG_CACHE").unwrap_or_else(|_| {
            format!(
                "{}/.cache/flowlog",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        format!("{cache}/chdb-kafka/bin/python3")
    })
}

/// Runs `flowlog-testkit/clickhouse_kafka.py` with `spec` (see its docstring): the shipped
/// ClickHouse reports on Parquet files, then on what `analysis/clickhouse/kafka.sql`'s Kafka
/// engine read from a topic, in one chDB session; returns its JSON.
pub fn clickhouse_kafka(spec: &serde_json::Value) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clickhouse_kafka.py");
    let python = chdb_kafka_python();
    let out = std::process::Command::new(&python)
        .args([script, &spec.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("running {python} (scripts/bootstrap makes it): {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the rows as JSON")
}

/// Log lines of the code under test, captured by a `tracing` subscriber of the test's own
/// ([`LogCapture::subscriber`]), for counting what was logged (a condition logged once, not once
/// per event).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}

impl LogCapture {
    /// A subscriber that writes every event here, without colours (install it with
    /// `tracing::subscriber::set_default` or `with_default`).
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .finish()
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// How many logged lines contain `text`.
    pub fn lines_containing(&self, text: &str) -> usize {
        self.text().lines().filter(|l| l.contains(text)).count()
    }
}

/// A free loopback port (nothing listens on it once this returns).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// One plain HTTP/1.1 GET of `path` from a process's metrics listener at `addr` (its
/// `/metrics`, `/healthz` or `/readyz`): the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let malformed = || std::io::Error::other(format!("malformed HTTP response: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_string()))
}

/// Polls `GET path` on `addr` every 100 ms until `done` holds for the answer; returns that
/// answer, or panics with the last one after [`PATIENCE`].
pub fn wait_for_http(
    addr: SocketAddr,
    path: &str,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = http_get(addr, path);
        if let Ok((status, body)) = &answer
            && done(*status, body)
        {
            return (*status, body.clone());
        }
        if Instant::now() > deadline {
            panic!(
                "GET {path} on {addr}: not the awaited answer within {PATIENCE:?}; last: {answer:?}"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A fresh, empty directory of this test process under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `command` with its stderr echoed line by line (prefixed with `tag`) and returns once a
/// line contains `ready` (the log line that says the process is up); panics naming the program
/// if that line has not come within [`PATIENCE`].
pub fn spawn_ready(command: &mut Command, tag: &str, ready: &'static str) -> ChildGuard {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {tag}: {e}"));
    let (tx, rx) = mpsc::channel();
    let lines = BufReader::new(child.stderr.take().expect("piped stderr"));
    let prefix = tag.to_owned();
    thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            eprintln!("{prefix}: {line}");
            if line.contains(ready) {
                let _ = tx.send(());
            }
        }
    });
    let mut guard = ChildGuard(child);
    if rx.recv_timeout(PATIENCE).is_err() {
        let status = guard.0.try_wait();
        panic!("{tag} did not log {ready:?} within {PATIENCE:?} ({status:?})");
    }
    guard
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves nothing
/// running.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Sends SIGTERM and waits up to `wait` for the exit; true if it exited successfully.
    pub fn terminate(&mut self, wait: Duration) -> bool {
        // SAFETY: kill(2) on our own child's pid, which is not reaped before this returns.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
