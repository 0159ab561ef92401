//! The Kafka output against a real Kafka-protocol broker (tansu, started by `scripts/kafka start`;
//! address from `FLOWLOG_TEST_KAFKA`, default 127.0.0.1:9092): real TCP traffic between network
//! namespaces → agent `--output kafka` → a plain rdkafka consumer that decodes every message with
//! apache-avro's generic reader and `schemas/flow_record.v1.avsc` (a reader we did not write);
//! the bad configurations (missing topic, bad option, unreachable broker); broker outages and
//! agent crashes against private brokers; TLS and SASL/SCRAM (`--kafka-config`) against a
//! private broker behind TLS (`flowlog_testkit::tls`), and what a wrong CA, host name or password
//! does at start; and, driving a `KafkaSink` in this process (its metrics and logs captured per
//! test), the full spool and the rewind after failed deliveries.
//!
//! Each test makes its own topic with a unique name and deletes it.
mod support;

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use apache_avro::{Schema, reader::datum::GenericDatumReader, types::Value};
use flowlog_sidecar::{
    kafka::{KafkaSettings, KafkaSink, Partitioning},
    record::{Direction, Family, FlowRecord, Outcome},
    sink::RecordSink,
};
use flowlog_testkit::{
    LogCapture, Topic,
    broker::PrivateBroker,
    brokers, free_port, runtime, temp_dir,
    tls::{TlsBroker, with_option},
};
use rdkafka::{Message, message::OwnedMessage};
use support::{AGENT, NetnsPair, PATIENCE, accept, connect, join_both, read_exact, server_port};

const SCHEMA_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../schemas/flow_record.v2.avsc"
);

/// The agent as a child process with `--output kafka`.
struct KafkaAgent {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    ready: mpsc::Receiver<()>,
    host: String,
    /// The spool directory this guard created (removed on drop), if the test named none.
    own_spool: Option<std::path::PathBuf>,
}

impl KafkaAgent {
    /// With a spool directory of its own (removed when the guard drops) unless `extra` names
    /// one.
    fn spawn(test: &str, topic: &str, brokers: &str, extra: &[&str]) -> Self {
        Self::spawn_env(test, topic, brokers, extra, &[])
    }

    /// [`KafkaAgent::spawn`] with environment variables `env` set.
    fn spawn_env(
        test: &str,
        topic: &str,
        brokers: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let host = format!("test-kafka-{test}-{}", std::process::id());
        let mut command = Command::new(AGENT);
        let own_spool =
            (!extra.contains(&"--spool-dir")).then(|| temp_dir(&format!("spool-{test}")));
        if let Some(dir) = &own_spool {
            command.args(["--spool-dir", dir.to_str().unwrap()]);
        }
        let mut child = command
            .args(["--output", "kafka", "--kafka-brokers", brokers])
            .args(["--kafka-topic", topic, "--host", &host])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            // Unpinned: agents of tests that run in parallel must not share the pin directory.
            .args(["--pin-dir", ""])
            .args(extra)
            .env_remove("FLOWLOG_LOG")
            .env_remove("FLOWLOG_KAFKA_OPTIONS")
            .env_remove("FLOWLOG_KAFKA_CONFIG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {AGENT}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, ready) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let buf = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let is_ready = line.contains("capturing TCP flows");
                {
                    let mut s = buf.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
                if is_ready {
                    let _ = tx.send(());
                }
            }
        });
        Self {
            child: Some(child),
            stderr,
            ready,
            host,
            own_spool,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_ready(&self) {
        if self.ready.recv_timeout(PATIENCE).is_err() {
            panic!(
                "the agent did not start capturing; stderr:\n{}",
                self.stderr()
            );
        }
    }

    /// Waits for the agent to exit on its own; its status and stderr.
    fn wait_exit(mut self, within: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                thread::sleep(Duration::from_millis(100));
                return (status, self.stderr());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not exit within {within:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status, how long the exit took, and stderr.
    fn terminate(mut self, within: Duration) -> (ExitStatus, Duration, String) {
        let child = self.child.as_ref().expect("running");
        // SAFETY: kill on the pid of our own child, not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        let stderr = Arc::clone(&self.stderr);
        let (status, _) = KafkaAgent {
            child: self.child.take(),
            stderr,
            ready: mpsc::channel().1,
            host: String::new(),
            own_spool: None,
        }
        .wait_exit(within);
        (status, start.elapsed(), self.stderr())
    }
}

impl Drop for KafkaAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("agent stderr:\n{}", self.stderr());
        }
        if let Some(dir) = self.own_spool.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A record as apache-avro's generic reader sees it, converted back field by field by name.
fn record_from_value(value: Value) -> FlowRecord {
    let Value::Record(fields) = value else {
        panic!("not a record: {value:?}")
    };
    let f: HashMap<String, Value> = fields.into_iter().collect();
    let long = |n: &str| match &f[n] {
        Value::Long(v) => *v as u64,
        v => panic!("{n}: {v:?}"),
    };
    let int = |n: &str| match &f[n] {
        Value::Int(v) => *v as u32,
        v => panic!("{n}: {v:?}"),
    };
    let string = |v: &Value| match v {
        Value::String(s) => s.clone(),
        v => panic!("{v:?}"),
    };
    let symbol = |n: &str| match &f[n] {
        Value::Enum(_, s) => s.clone(),
        v => panic!("{n}: {v:?}"),
    };
    let addr = |n: &str| match &f[n] {
        Value::Bytes(b) if b.len() == 4 => IpAddr::from(<[u8; 4]>::try_from(&b[..]).unwrap()),
        Value::Bytes(b) if b.len() == 16 => IpAddr::from(<[u8; 16]>::try_from(&b[..]).unwrap()),
        v => panic!("{n}: {v:?}"),
    };
    let nullable = |n: &str| match &f[n] {
        Value::Union(0, _) => None,
        Value::Union(_, v) => Some((**v).clone()),
        v => panic!("{n}: {v:?}"),
    };
    FlowRecord {
        flow_id: long("flow_id"),
        host: string(&f["host"]),
        seq: int("seq"),
        start_ns: long("start_ns"),
        end_ns: long("end_ns"),
        family: match symbol("family").as_str() {
            "ipv4" => Family::Ipv4,
            "ipv6" => Family::Ipv6,
            s => panic!("family {s}"),
        },
        local_addr: addr("local_addr"),
        local_port: int("local_port") as u16,
        remote_addr: addr("remote_addr"),
        remote_port: int("remote_port") as u16,
        direction: match symbol("direction").as_str() {
            "outbound" => Direction::Outbound,
            "inbound" => Direction::Inbound,
            s => panic!("direction {s}"),
        },
        outcome: match symbol("outcome").as_str() {
            "closed" => Outcome::Closed,
            "reset" => Outcome::Reset,
            "failed" => Outcome::Failed,
            "open" => Outcome::Open,
            s => panic!("outcome {s}"),
        },
        bytes_sent: long("bytes_sent"),
        bytes_received: long("bytes_received"),
        segs_sent: long("segs_sent"),
        segs_received: long("segs_received"),
        retransmits: long("retransmits"),
        resets_sent: long("resets_sent"),
        resets_received: long("resets_received"),
        srtt_us: int("srtt_us"),
        min_rtt_us: int("min_rtt_us"),
        pid: nullable("pid").map(|v| match v {
            Value::Int(p) => p as u32,
            v => panic!("pid {v:?}"),
        }),
        comm: nullable("comm").map(|v| string(&v)),
        cgroup_id: nullable("cgroup_id").map(|v| match v {
            Value::Long(c) => c as u64,
            v => panic!("cgroup_id {v:?}"),
        }),
        adopted: match &f["adopted"] {
            Value::Boolean(b) => *b,
            v => panic!("adopted {v:?}"),
        },
    }
}

/// Reads every message of `topic` from the beginning (all partitions assigned, no group
/// rebalancing) until `done` holds for the decoded records or [`PATIENCE`] runs out.
/// Each message is decoded with apache-avro and the schema file, and checked against the
/// project's own decoder and the key it should have.
fn consume(topic: &Topic, done: impl Fn(&[FlowRecord]) -> bool) -> Vec<FlowRecord> {
    let schema_text = std::fs::read_to_string(SCHEMA_FILE).expect("reading the schema file");
    let schema = Schema::parse_str(&schema_text).expect("parsing the schema file");
    let reader = GenericDatumReader::builder(&schema).build().unwrap();
    let decode = |message: &OwnedMessage| {
        let payload = message.payload().expect("a message value");
        assert_eq!(payload[0], 0, "Confluent magic byte");
        assert_eq!(
            payload[1..5],
            flowlog_record::avro::DEFAULT_SCHEMA_ID.to_be_bytes(),
            "Confluent header: the default schema id of version 2"
        );
        let mut datum = &payload[5..];
        let value = reader
            .read_value(&mut datum)
            .expect("apache-avro reads the message with the schema file");
        assert!(datum.is_empty(), "bytes left after the datum");
        let record = record_from_value(value);
        let (_, ours) = flowlog_record::avro::decode(payload).expect("our decoder reads it");
        assert_eq!(ours, record, "the two decoders disagree");
        assert_eq!(
            message.key(),
            Some(&flowlog_record::avro::key(&record)[..]),
            "message key"
        );
        record
    };
    let messages = topic.read_until(|m| done(&m.iter().map(decode).collect::<Vec<_>>()));
    messages.iter().map(decode).collect()
}

/// One transfer: the client sends `up` bytes, the server `down` bytes, both close.
fn transfer(pair: &NetnsPair, v6: bool, up: usize, down: usize) -> (SocketAddr, SocketAddr) {
    let (_, server_ip) = pair.addrs(v6);
    let listener = pair.listen(SocketAddr::new(server_ip, server_port()));
    let server_addr = listener.local_addr().unwrap();
    let server = pair.server("server", move || {
        let (mut s, peer) = accept(&listener);
        let got = read_exact(&mut s, up);
        assert_eq!(got.len(), up);
        s.write_all(&vec![7u8; down]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        peer
    });
    let client = pair.client("client", move || {
        let mut c = connect(server_addr);
        c.write_all(&vec![3u8; up]).unwrap();
        let got = read_exact(&mut c, down);
        assert_eq!(got.len(), down);
        let local = c.local_addr().unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        local
    });
    let (client_addr, peer) = join_both(client, server);
    assert_eq!(client_addr, peer);
    (client_addr, server_addr)
}

#[test]
fn round_trip_exact_flows_through_the_broker() {
    let topic = Topic::create("roundtrip", 3);
    let pair = NetnsPair::new(41);
    let agent = KafkaAgent::spawn("roundtrip", &topic.name, &brokers(), &[]);
    agent.wait_ready();

    let mut expected = Vec::new();
    for (i, (up, down)) in [(1, 0), (1000, 70_000), (123_457, 3), (0, 5000)]
        .into_iter()
        .enumerate()
    {
        let v6 = i % 2 == 1;
        let (client, server) = transfer(&pair, v6, up, down);
        expected.push((client, server, up as u64, down as u64));
    }
    let host = agent.host.clone();
    let addrs = [
        pair.client_v4,
        pair.server_v4,
        pair.client_v6,
        pair.server_v6,
    ];
    let ours = move |r: &FlowRecord| {
        r.host == host && addrs.contains(&r.local_addr) && addrs.contains(&r.remote_addr)
    };
    let n = expected.len() * 2;
    let all = consume(&topic, |rs| rs.iter().filter(|r| ours(r)).count() >= n);
    let (status, _, stderr) = agent.terminate(PATIENCE);
    assert!(status.success(), "agent exit {status}; stderr:\n{stderr}");

    // Each (host, flow_id, seq) once, over everything in the topic.
    let mut seen = HashSet::new();
    for r in &all {
        assert!(
            seen.insert((r.host.clone(), r.flow_id, r.seq)),
            "duplicate {r:?}"
        );
    }
    let records: Vec<&FlowRecord> = all.iter().filter(|r| ours(r)).collect();
    assert_eq!(records.len(), n, "{records:#?}");
    for (client, server, up, down) in expected {
        let out: Vec<_> = records
            .iter()
            .filter(|r| {
                r.direction == Direction::Outbound
                    && r.local_addr == client.ip()
                    && r.local_port == client.port()
                    && r.remote_addr == server.ip()
                    && r.remote_port == server.port()
            })
            .collect();
        let inb: Vec<_> = records
            .iter()
            .filter(|r| {
                r.direction == Direction::Inbound
                    && r.local_addr == server.ip()
                    && r.local_port == server.port()
                    && r.remote_addr == client.ip()
                    && r.remote_port == client.port()
            })
            .collect();
        assert_eq!(
            out.len(),
            1,
            "outbound record of {client} → {server}: {records:#?}"
        );
        assert_eq!(
            inb.len(),
            1,
            "inbound record of {client} → {server}: {records:#?}"
        );
        let (o, i) = (out[0], inb[0]);
        assert_eq!((o.bytes_sent, o.bytes_received), (up, down), "{o:?}");
        assert_eq!((i.bytes_sent, i.bytes_received), (down, up), "{i:?}");
        for r in [o, i] {
            assert_eq!(r.outcome, Outcome::Closed, "{r:?}");
            assert_eq!(r.seq, 0, "{r:?}");
            let family = if client.is_ipv6() {
                Family::Ipv6
            } else {
                Family::Ipv4
            };
            assert_eq!(r.family, family, "{r:?}");
        }
    }
}

#[test]
fn missing_topic_is_a_clear_error() {
    let topic = format!("flowlog-test-missing-{}", std::process::id());
    let agent = KafkaAgent::spawn("missing", &topic, &brokers(), &[]);
    let (status, stderr) = agent.wait_exit(PATIENCE);
    assert!(!status.success(), "exit {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "Kafka topic `{topic}` does not exist on {}",
            brokers()
        )),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("capturing TCP flows"), "stderr:\n{stderr}");
}

#[test]
fn bad_option_is_a_usage_error_naming_it() {
    // Rejected before the broker is asked anything: no topic needed.
    let topic = "flows.raw";
    let agent = KafkaAgent::spawn(
        "badoption",
        topic,
        &brokers(),
        &["--kafka-option", "no.such.option=1"],
    );
    let (status, stderr) = agent.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("no.such.option"), "stderr:\n{stderr}");
    assert!(stderr.contains("--kafka-option"), "stderr:\n{stderr}");

    let agent = KafkaAgent::spawn(
        "badoption",
        topic,
        &brokers(),
        &["--kafka-option", "linger.ms"],
    );
    let (status, stderr) = agent.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("KEY=VALUE"), "stderr:\n{stderr}");
}

#[test]
fn unreachable_broker_keeps_capturing_and_exits_in_bounded_time() {
    let closed = format!("127.0.0.1:{}", free_port());
    let agent = KafkaAgent::spawn("unreachable", "flows.raw", &closed, &[]);
    agent.wait_ready();
    // Some flows for the producer to hold: a loopback connection, closed at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (s, _) = listener.accept().unwrap();
    drop((c, s));
    thread::sleep(Duration::from_secs(1));
    let (status, took, stderr) = agent.terminate(PATIENCE);
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    // 10 s bounded shutdown wait, plus purge and exit.
    assert!(took < Duration::from_secs(15), "exit took {took:?}");
    assert_eq!(
        stderr.matches("Kafka brokers unreachable").count(),
        1,
        "the unreachable broker is logged once; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&closed),
        "stderr names the brokers:\n{stderr}"
    );
    assert!(
        stderr.contains("not delivered to Kafka"),
        "undelivered records are accounted for at exit; stderr:\n{stderr}"
    );
}

/// `n` loopback connections to one listener of ours: connection `i` sends `up(i)` bytes and
/// receives `down(i)`. Returns the listener's port and, per client port, (up, down).
fn loopback_flows(n: usize) -> (u16, HashMap<u16, (u64, u64)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut flows = HashMap::new();
    for i in 0..n {
        let (up, down) = (1 + i * 997, 3 + i * 131);
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut s, peer) = listener.accept().unwrap();
        c.write_all(&vec![1u8; up]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), up);
        s.write_all(&vec![2u8; down]).unwrap();
        drop(s);
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), down);
        drop(c);
        flows.insert(peer.port(), (up as u64, down as u64));
    }
    // Keep the port ours until the records are in: nobody else's flow can use it.
    std::mem::forget(listener);
    (port, flows)
}

/// Checks that every flow of [`loopback_flows`] arrived with both ends' records, exact bytes;
/// returns how many duplicates `(host, flow_id, seq)` of ours the topic holds.
fn check_loopback(
    all: &[FlowRecord],
    host: &str,
    port: u16,
    flows: &HashMap<u16, (u64, u64)>,
) -> usize {
    let mut seen = HashSet::new();
    let mut dups = 0;
    let mut unique = Vec::new();
    for r in all
        .iter()
        .filter(|r| r.host == host && is_ours(r, port, flows))
    {
        if seen.insert((r.host.clone(), r.flow_id, r.seq)) {
            unique.push(r);
        } else {
            dups += 1;
        }
    }
    assert_eq!(unique.len(), flows.len() * 2, "{unique:#?}");
    for (&client, &(up, down)) in flows {
        let out: Vec<_> = unique
            .iter()
            .filter(|r| r.direction == Direction::Outbound && r.local_port == client)
            .collect();
        let inb: Vec<_> = unique
            .iter()
            .filter(|r| r.direction == Direction::Inbound && r.remote_port == client)
            .collect();
        assert_eq!(
            (out.len(), inb.len()),
            (1, 1),
            "flow from port {client}: {unique:#?}"
        );
        let (o, i) = (out[0], inb[0]);
        assert_eq!((o.remote_port, i.local_port), (port, port));
        assert_eq!((o.bytes_sent, o.bytes_received), (up, down), "{o:?}");
        assert_eq!((i.bytes_sent, i.bytes_received), (down, up), "{i:?}");
        assert_eq!((o.outcome, i.outcome), (Outcome::Closed, Outcome::Closed));
    }
    dups
}

fn is_ours(r: &FlowRecord, port: u16, flows: &HashMap<u16, (u64, u64)>) -> bool {
    (r.local_port == port && flows.contains_key(&r.remote_port))
        || (r.remote_port == port && flows.contains_key(&r.local_port))
}

const OUTAGE_FLOWS: usize = 20;

/// tansu 0.6's sqlite storage panics in `idempotent_message_check` ("more or less than one row")
/// when an idempotent producer's batches are retried across a broker stop/restart, and its
/// storage service stays dead afterwards. The outage tests therefore produce without
/// idempotence (the agent's default stays on); duplicates are allowed and counted anyway.
const TANSU_RESTART_WORKAROUND: [&str; 2] = ["--kafka-option", "enable.idempotence=false"];

#[test]
fn broker_outage_loses_nothing() {
    let broker = PrivateBroker::start("outage");
    let topic = Topic::create_on(&broker.addr, "outage", 3);
    let agent = KafkaAgent::spawn(
        "outage",
        &topic.name,
        &broker.addr,
        &TANSU_RESTART_WORKAROUND,
    );
    agent.wait_ready();
    broker.stop();
    let (port, flows) = loopback_flows(OUTAGE_FLOWS);
    // Let the agent capture them (and librdkafka notice the broker is gone).
    thread::sleep(Duration::from_secs(2));
    broker.restart(&topic.name);
    let host = agent.host.clone();
    let all = consume(&topic, |rs| {
        rs.iter()
            .filter(|r| r.host == host && is_ours(r, port, &flows))
            .map(|r| (r.flow_id, r.seq))
            .collect::<HashSet<_>>()
            .len()
            >= OUTAGE_FLOWS * 2
    });
    let (status, _, stderr) = agent.terminate(PATIENCE);
    assert!(status.success(), "agent exit {status}; stderr:\n{stderr}");
    let dups = check_loopback(&all, &host, port, &flows);
    eprintln!("outage: {} records, {dups} duplicates", OUTAGE_FLOWS * 2);
    // The topic lives in the private broker's directory, removed with it.
    std::mem::forget(topic);
}

#[test]
fn agent_crash_while_broker_down_loses_nothing() {
    let broker = PrivateBroker::start("crash");
    let topic = Topic::create_on(&broker.addr, "crash", 3);
    broker.stop();
    let spool = temp_dir("crash-spool");
    let spool_arg = spool.to_str().unwrap();
    let extra = [
        "--spool-dir",
        spool_arg,
        TANSU_RESTART_WORKAROUND[0],
        TANSU_RESTART_WORKAROUND[1],
    ];
    let agent = KafkaAgent::spawn("crash", &topic.name, &broker.addr, &extra);
    agent.wait_ready();
    let (port, flows) = loopback_flows(OUTAGE_FLOWS);
    // Captured and written to the spool within a drain interval or two.
    thread::sleep(Duration::from_secs(2));
    let host = agent.host.clone();
    drop(agent); // kill -9
    broker.restart(&topic.name);
    let agent = KafkaAgent::spawn("crash", &topic.name, &broker.addr, &extra);
    agent.wait_ready();
    let all = consume(&topic, |rs| {
        rs.iter()
            .filter(|r| r.host == host && is_ours(r, port, &flows))
            .map(|r| (r.flow_id, r.seq))
            .collect::<HashSet<_>>()
            .len()
            >= OUTAGE_FLOWS * 2
    });
    let (status, _, stderr) = agent.terminate(PATIENCE);
    assert!(status.success(), "agent exit {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("replaying them first"),
        "the restart reports the spooled records; stderr:\n{stderr}"
    );
    let dups = check_loopback(&all, &host, port, &flows);
    eprintln!("crash: {} records, {dups} duplicates", OUTAGE_FLOWS * 2);
    std::mem::forget(topic);
    let _ = std::fs::remove_dir_all(&spool);
}

/// `n` records of distinct flows of `host`, all of one encoded size (every varint has the same
/// width whatever `i`), so that how many fit in a spool follows from its format alone.
fn synthetic_records(host: &str, n: usize) -> Vec<FlowRecord> {
    (0..n)
        .map(|i| {
            let start_ns = 1_800_000_000_000_000_000 + i as u64 * 1_000;
            FlowRecord {
                flow_id: (1 << 40) + i as u64,
                host: host.to_string(),
                start_ns,
                end_ns: start_ns + 250_000,
                local_addr: IpAddr::from([198, 51, 100, 1]),
                local_port: 40_000 + i as u16,
                remote_addr: IpAddr::from([198, 51, 100, 2]),
                remote_port: 443,
                bytes_sent: 100,
                bytes_received: 200,
                segs_sent: 5,
                segs_received: 6,
                srtt_us: 100,
                min_rtt_us: 90,
                pid: Some(1234),
                comm: Some("synthetic".to_string()),
                cgroup_id: Some(1),
                ..FlowRecord::default()
            }
        })
        .collect()
}

/// Runs `f` with this thread's metrics in a Prometheus recorder of its own (`f` gets its handle
/// to render them) and its logs in a [`LogCapture`]: a [`KafkaSink`] driven from this thread
/// counts and logs there, apart from the other tests of this process.
fn observed<T>(
    f: impl FnOnce(&metrics_exporter_prometheus::PrometheusHandle) -> T,
) -> (T, LogCapture) {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let logs = LogCapture::default();
    let out = tracing::subscriber::with_default(logs.subscriber(), || {
        metrics::with_local_recorder(&recorder, || f(&handle))
    });
    (out, logs)
}

fn metric(metrics: &metrics_exporter_prometheus::PrometheusHandle, name: &str) -> f64 {
    support::Agent::metric(&metrics.render(), name).unwrap_or(0.0)
}

/// Pumps the sink until the spool is empty and nothing is in flight.
fn deliver_all(rt: &tokio::runtime::Runtime, sink: &mut KafkaSink) {
    let deadline = Instant::now() + PATIENCE;
    while sink.spool().len_records() > 0 || sink.in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} records still spooled, {} in flight",
            sink.spool().len_records(),
            sink.in_flight()
        );
        thread::sleep(Duration::from_millis(10));
        rt.block_on(sink.idle()).unwrap();
    }
}

/// Our records in the topic (by host), each checked against the one that was written.
fn ours_in_topic<'a>(
    all: &'a [FlowRecord],
    written: &HashMap<u64, &FlowRecord>,
    host: &str,
) -> Vec<&'a FlowRecord> {
    let ours: Vec<&FlowRecord> = all.iter().filter(|r| r.host == host).collect();
    for r in &ours {
        assert_eq!(
            Some(*r),
            written.get(&r.flow_id).copied(),
            "a record we wrote"
        );
    }
    ours
}

#[test]
fn full_spool_drops_the_newest_counts_them_logs_once_and_delivers_the_rest() {
    let broker = PrivateBroker::start("full");
    let topic = Topic::create_on(&broker.addr, "full", 3);
    broker.stop();
    let host = format!("test-kafka-full-{}", std::process::id());
    let records = synthetic_records(&host, 50);
    let len = |r: &FlowRecord| {
        let mut value = Vec::new();
        flowlog_record::avro::encode(r, flowlog_record::avro::DEFAULT_SCHEMA_ID, &mut value);
        (flowlog_record::avro::key(r).len() + value.len()) as u64
    };
    let body = len(&records[0]);
    assert!(records.iter().all(|r| len(r) == body), "one size for all");
    // The spool's format (spool/format.rs): a segment starts with a 16-byte header and rolls at an
    // eighth of the limit; a record takes a 12-byte header plus key and value. With the limit at
    // 8 × (16 + 4 × (12 + body)), 8 segments of exactly 4 records fill it: 32 records fit.
    let max = 8 * (16 + 4 * (12 + body));
    let fits = 32;
    let spool = temp_dir("full-spool");
    let mut settings = KafkaSettings::new(&broker.addr, &topic.name);
    settings.spool_dir = spool.clone();
    settings.spool_max_bytes = max;
    settings.metadata_timeout = Duration::from_secs(1);
    settings.options = vec![("enable.idempotence".into(), "false".into())];

    let rt = runtime();
    let ((), logs) = observed(|metrics| {
        let mut sink = KafkaSink::connect(settings).expect("the sink starts with the broker down");
        // Two writes, as two drains of the agent would hand them over.
        rt.block_on(sink.write(&records[..20])).unwrap();
        rt.block_on(sink.write(&records[20..])).unwrap();
        rt.block_on(sink.flush()).unwrap();
        assert_eq!(sink.spool().len_records(), fits);
        assert_eq!(sink.spool().len_bytes(), max);
        assert_eq!(
            metric(metrics, "flowlog_sidecar_spool_dropped_total"),
            (records.len() - fits as usize) as f64
        );
        broker.restart(&topic.name);
        deliver_all(&rt, &mut sink);
        assert_eq!(
            metric(metrics, "flowlog_sidecar_spool_dropped_total"),
            (records.len() - fits as usize) as f64,
            "nothing dropped once the broker is back"
        );
    });
    let logs = logs.text();
    assert_eq!(
        logs.lines().filter(|l| l.contains("is full")).count(),
        1,
        "the drops are logged once; logs:\n{logs}"
    );

    let written: HashMap<u64, &FlowRecord> = records.iter().map(|r| (r.flow_id, r)).collect();
    let all = consume(&topic, |rs| {
        rs.iter()
            .filter(|r| r.host == host)
            .map(|r| r.flow_id)
            .collect::<HashSet<_>>()
            .len()
            >= fits as usize
    });
    let delivered: HashSet<u64> = ours_in_topic(&all, &written, &host)
        .iter()
        .map(|r| r.flow_id)
        .collect();
    let expected: HashSet<u64> = records[..fits as usize].iter().map(|r| r.flow_id).collect();
    assert_eq!(
        delivered, expected,
        "the oldest 32 arrive, none of the dropped"
    );
    std::mem::forget(topic);
    let _ = std::fs::remove_dir_all(&spool);
}

#[test]
fn delivery_failures_rewind_the_spool_and_every_record_arrives() {
    let broker = PrivateBroker::start("rewind");
    let topic = Topic::create_on(&broker.addr, "rewind", 3);
    let host = format!("test-kafka-rewind-{}", std::process::id());
    let records = synthetic_records(&host, 40);
    let n = records.len();
    let spool = temp_dir("rewind-spool");
    let mut settings = KafkaSettings::new(&broker.addr, &topic.name);
    settings.spool_dir = spool.clone();
    // librdkafka gives up on a message after 1 s: with the broker down, every record fails.
    settings.options = vec![
        ("message.timeout.ms".into(), "1000".into()),
        ("enable.idempotence".into(), "false".into()),
    ];

    let rt = runtime();
    let ((sent, failed_while_down, failed), _) = observed(|metrics| {
        let mut sink = KafkaSink::connect(settings).expect("the sink starts");
        broker.stop();
        rt.block_on(sink.write(&records)).unwrap();
        rt.block_on(sink.flush()).unwrap();
        // Every record's delivery fails at least once while the broker is down.
        let deadline = Instant::now() + PATIENCE;
        while metric(metrics, "flowlog_sidecar_kafka_undelivered_total") < n as f64 {
            assert!(Instant::now() < deadline, "deliveries did not fail");
            thread::sleep(Duration::from_millis(10));
            rt.block_on(sink.idle()).unwrap();
        }
        assert_eq!(
            sink.spool().len_records(),
            n as u64,
            "failed records stay in the spool"
        );
        assert_eq!(
            metric(metrics, "flowlog_sidecar_kafka_records_sent_total"),
            0.0
        );
        let failed_while_down = metric(metrics, "flowlog_sidecar_kafka_undelivered_total");
        broker.restart(&topic.name);
        deliver_all(&rt, &mut sink);
        (
            metric(metrics, "flowlog_sidecar_kafka_records_sent_total"),
            failed_while_down,
            metric(metrics, "flowlog_sidecar_kafka_undelivered_total"),
        )
    });
    assert!(failed_while_down >= n as f64);
    // The spool is empty only once every record was acknowledged at least once.
    assert!(sent >= n as f64, "sent {sent}");

    let written: HashMap<u64, &FlowRecord> = records.iter().map(|r| (r.flow_id, r)).collect();
    // Read until the topic holds as many of ours as the broker acknowledged.
    let all = consume(&topic, |rs| {
        rs.iter().filter(|r| r.host == host).count() >= sent as usize
    });
    let ours = ours_in_topic(&all, &written, &host);
    let unique: HashSet<(u64, u32)> = ours.iter().map(|r| (r.flow_id, r.seq)).collect();
    assert_eq!(unique.len(), n, "each (host, flow_id, seq) at least once");
    // Duplicates: a record the broker wrote twice (re-produced after a report that said it
    // failed, or acknowledged twice). Consumers drop them by (host, flow_id, seq).
    let duplicates = ours.len() - n;
    assert!(
        ours.len() as f64 >= sent,
        "every acknowledged message is in the topic"
    );
    eprintln!(
        "rewind: {n} records, {failed} failed deliveries ({failed_while_down} while the broker \
         was down), {sent} acknowledged, {duplicates} duplicates in the topic"
    );
    std::mem::forget(topic);
    let _ = std::fs::remove_dir_all(&spool);
}

#[test]
fn tls_and_scram_deliver_the_exact_records() {
    let broker = TlsBroker::start("agent", true);
    let topic = broker.topic("tls", 3);
    let password = broker.scram.as_ref().unwrap().password.clone();
    // Debug logs, librdkafka's own included (its configuration and security steps): the
    // password must appear in none of them.
    let options = with_option(broker.client_options(), "debug", "conf,security,broker");
    let config = broker.properties("client.properties", &options);
    let config = config.to_str().unwrap();
    let agent = KafkaAgent::spawn_env(
        "tls",
        &topic.name,
        &broker.brokers(),
        &["--kafka-config", config],
        &[("FLOWLOG_LOG", "debug")],
    );
    agent.wait_ready();
    let (port, flows) = loopback_flows(5);
    let host = agent.host.clone();
    let all = consume(&topic, |rs| {
        rs.iter()
            .filter(|r| r.host == host && is_ours(r, port, &flows))
            .count()
            >= flows.len() * 2
    });
    let (status, _, stderr) = agent.terminate(PATIENCE);
    assert!(status.success(), "agent exit {status}; stderr:\n{stderr}");
    assert_eq!(check_loopback(&all, &host, port, &flows), 0, "duplicates");
    assert!(
        stderr.contains("security.protocol = sasl_ssl")
            && stderr.contains("sasl.password = [redacted]"),
        "librdkafka's debug logs are in the test's view: stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains(&password),
        "the password was logged:\n{stderr}"
    );
}

#[test]
fn tls_and_sasl_refusals_are_start_up_errors_naming_broker_and_cause() {
    let broker = TlsBroker::start("agent-refused", true);
    let topic = broker.topic("refused", 1);
    let good = broker.client_options();
    let password = broker.scram.as_ref().unwrap().password.clone();
    let localhost = broker.brokers();
    let by_ip = format!("127.0.0.1:{}", broker.port);
    let wrong_password = format!("not-{password}");
    let cases = [
        (
            "wrong CA",
            localhost.clone(),
            with_option(
                good.clone(),
                "ssl.ca.location",
                broker.other_ca.to_str().unwrap(),
            ),
            format!("TLS handshake with Kafka broker {localhost} failed"),
            "certificate verify failed: unable to get local issuer certificate (no CA of \
             ssl.ca.location signed the broker's certificate)",
        ),
        (
            // The certificate is for `localhost`, not for the address.
            "host name mismatch",
            by_ip.clone(),
            good.clone(),
            format!("TLS handshake with Kafka broker {by_ip} failed"),
            "certificate verify failed: IP address mismatch (the broker's certificate is not \
             for `127.0.0.1`)",
        ),
        (
            "wrong password",
            localhost.clone(),
            with_option(good.clone(), "sasl.password", &wrong_password),
            format!("SASL authentication with Kafka broker {localhost} failed"),
            "SASL SCRAM authentication failed",
        ),
    ];
    for (case, brokers, options, names_broker, cause) in cases {
        let config = broker.properties("client.properties", &options);
        let started = Instant::now();
        let agent = KafkaAgent::spawn(
            "refused",
            &topic.name,
            &brokers,
            &["--kafka-config", config.to_str().unwrap()],
        );
        let (status, stderr) = agent.wait_exit(Duration::from_secs(15));
        let took = started.elapsed();
        assert_eq!(status.code(), Some(1), "{case}: stderr:\n{stderr}");
        assert!(took < Duration::from_secs(8), "{case}: took {took:?}");
        let error = stderr
            .lines()
            .find(|l| l.contains("ERROR"))
            .unwrap_or_else(|| panic!("{case}: no error line in\n{stderr}"));
        eprintln!("{case} ({took:?}): {error}");
        assert!(error.contains(&names_broker), "{case}: {error}");
        assert_eq!(
            error.matches("://").count(),
            0,
            "{case}: one broker name: {error}"
        );
        assert!(error.contains(cause), "{case}: {error}");
        assert!(!stderr.contains("capturing TCP flows"), "{case}: {stderr}");
        assert!(
            !stderr.contains(&password) && !stderr.contains(&wrong_password),
            "{case}: a password was logged:\n{stderr}"
        );
    }
}

#[test]
fn a_kafka_config_file_that_cannot_be_used_is_a_usage_error_naming_it() {
    let dir = temp_dir("kafka-config");
    let file = dir.join("client.properties");
    let shown = file.display().to_string();
    let cases = [
        (
            "# TLS\nsecurity.protocol=SSL\nhunter2\n",
            format!("{shown} line 3: expected `key=value`"),
        ),
        (
            "security.protocol=SSL\nssl.ca.locaton=/etc/flowlog/kafka/ca.pem\n",
            format!(
                "{shown} line 2: librdkafka option `ssl.ca.locaton`: No such configuration property"
            ),
        ),
        (
            "security.protocol=SASL_SSL\nsasl.jaas.config=x required password=\"hunter2\";\n",
            "librdkafka takes `sasl.username` and `sasl.password`".to_string(),
        ),
        (
            "security.protocol=SSL\nssl.ca.location=/nonexistent/ca.pem\n",
            format!("{shown}: librdkafka refused these settings: ssl.ca.location failed"),
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&file, text).unwrap();
        let agent = KafkaAgent::spawn(
            "config",
            "flows.raw",
            &brokers(),
            &["--kafka-config", &shown],
        );
        let (status, stderr) = agent.wait_exit(PATIENCE);
        assert_eq!(status.code(), Some(2), "{text}: stderr:\n{stderr}");
        assert!(stderr.contains("'--kafka-config'"), "{stderr}");
        assert!(
            stderr.contains(&expected),
            "expected {expected:?} in:\n{stderr}"
        );
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    let missing = dir.join("missing.properties");
    let agent = KafkaAgent::spawn_env(
        "config",
        "flows.raw",
        &brokers(),
        &[],
        &[("FLOWLOG_KAFKA_CONFIG", missing.to_str().unwrap())],
    );
    let (status, stderr) = agent.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "reading the Kafka client configuration {}: No such file",
            missing.display()
        )),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `close` is the agent's shutdown: it waits (up to `shutdown_wait`) until everything written
/// is acknowledged, without the caller pumping the sink; what the broker does not take in that
/// time stays in the spool, is logged, and is there for the next start.
#[test]
fn close_delivers_what_was_written_or_keeps_it_in_the_spool() {
    let rt = runtime();
    let topic = Topic::create("close", 3);
    let host = format!("test-kafka-close-{}", std::process::id());
    let records = synthetic_records(&host, 25);
    let spool = temp_dir("close-spool");
    let mut settings = KafkaSettings::new(topic.brokers.as_str(), &topic.name);
    settings.spool_dir = spool.clone();
    let mut sink = KafkaSink::connect(settings).expect("the sink starts");
    rt.block_on(sink.write(&records)).unwrap();
    rt.block_on(sink.close()).unwrap();
    assert_eq!(sink.spool().len_records(), 0, "close waited for every ack");
    assert_eq!(sink.in_flight(), 0);
    drop(sink);
    let written: HashMap<u64, &FlowRecord> = records.iter().map(|r| (r.flow_id, r)).collect();
    let all = consume(&topic, |rs| {
        rs.iter().filter(|r| r.host == host).count() >= 25
    });
    let delivered: HashSet<u64> = ours_in_topic(&all, &written, &host)
        .iter()
        .map(|r| r.flow_id)
        .collect();
    assert_eq!(delivered, written.keys().copied().collect());
    let _ = std::fs::remove_dir_all(&spool);

    // No broker: close gives up after `shutdown_wait` and the records stay spooled.
    let spool = temp_dir("close-down-spool");
    let mut settings = KafkaSettings::new(format!("127.0.0.1:{}", free_port()), "nowhere");
    settings.spool_dir = spool.clone();
    settings.metadata_timeout = Duration::from_millis(200);
    settings.shutdown_wait = Duration::from_millis(300);
    let ((), logs) = observed(|_| {
        let mut sink = KafkaSink::connect(settings).expect("the sink starts with no broker");
        rt.block_on(sink.write(&records)).unwrap();
        let start = Instant::now();
        rt.block_on(sink.close()).unwrap();
        let took = start.elapsed();
        assert!(took < Duration::from_secs(3), "close took {took:?}");
        assert_eq!(sink.spool().len_records(), records.len() as u64);
    });
    let logs = logs.text();
    assert!(
        logs.contains("kept in the spool, delivered at the next start"),
        "logs:\n{logs}"
    );
    assert!(!logs.contains("dropped without close"), "logs:\n{logs}");
    let (reopened, _) = flowlog_sidecar::spool::Spool::open(&spool, 1 << 20).unwrap();
    assert_eq!(reopened.len_records(), records.len() as u64);
    drop(reopened);
    let _ = std::fs::remove_dir_all(&spool);
}

/// Writes `records` through a sink with `partitioning` into `topic` and returns, per
/// message of the topic, its partition and flow id (after every record was acknowledged).
fn partitions_of(
    topic: &Topic,
    records: &[FlowRecord],
    partitioning: Partitioning,
    test: &str,
) -> Vec<(i32, u64)> {
    let spool = temp_dir(&format!("{test}-spool"));
    let mut settings = KafkaSettings::new(topic.brokers.as_str(), &topic.name);
    settings.spool_dir = spool.clone();
    settings.partitioning = partitioning;
    let rt = runtime();
    let mut sink = KafkaSink::connect(settings).expect("the sink starts");
    rt.block_on(sink.write(records)).unwrap();
    rt.block_on(sink.flush()).unwrap();
    deliver_all(&rt, &mut sink);
    rt.block_on(sink.close()).unwrap();
    let _ = std::fs::remove_dir_all(&spool);
    topic
        .read_all()
        .iter()
        .map(|m| {
            let (id, _) = flowlog_record::avro::parse_key(m.key().unwrap()).unwrap();
            (m.partition(), id)
        })
        .collect()
}

#[test]
fn records_go_to_their_hosts_partition_or_spread_by_flow() {
    let records = synthetic_records(&format!("test-kafka-part-{}", std::process::id()), 60);
    let key = flowlog_record::avro::key(&records[0]);
    let host_partition = flowlog_record::avro::host_partition(&key, 3).unwrap();

    let by_host = Topic::create("part-host", 3);
    let placed = partitions_of(&by_host, &records, Partitioning::Host, "part-host");
    assert_eq!(placed.len(), records.len(), "every record once");
    assert!(
        placed.iter().all(|&(p, _)| p == host_partition),
        "every record in the partition Kafka's default partitioner gives the host name \
         ({host_partition}): {placed:?}"
    );

    let by_flow = Topic::create("part-flow", 3);
    let placed = partitions_of(&by_flow, &records, Partitioning::Flow, "part-flow");
    assert_eq!(placed.len(), records.len(), "every record once");
    let used: HashSet<i32> = placed.iter().map(|&(p, _)| p).collect();
    // 60 distinct keys all landing in one of 3 partitions has a chance of 3 / 3^60.
    assert_eq!(used.len(), 3, "spread by flow: {placed:?}");
}
