//! The images, run with exactly the manifests' privileges (the specs in `flowlog_deploy::podman`,
//! which must match deploy/kubernetes): built with `scripts/images` from the binaries this
//! `cargo test` built, then run with podman —
//! - the agent image with the DaemonSet's user, capabilities (CAP_BPF, CAP_PERFMON and nothing
//!   else), read-only root, hostPath mounts and seccomp `RuntimeDefault` records real TCP
//!   connections made here with their exact byte counts;
//! - the same without any one of those capabilities fails at start, within seconds, with an
//!   error naming it; under a seccomp profile that refuses bpf(2) without CAP_SYS_ADMIN it fails
//!   saying so;
//! - the enricher and inventory images, as uid 65532 with no capability and a read-only root,
//!   enrich a flow record end to end through the test Kafka broker (`FLOWLOG_TEST_KAFKA`);
//! - the one-host image captures a connection into Parquet.
//!
//! Needs root (eBPF), podman and runc (scripts/bootstrap), and the test broker (scripts/test
//! starts it). The containers see every TCP flow of the host, so records are selected by the
//! exact ports of the test's own connections.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use flowlog_deploy::podman::{
    self, Container, PATIENCE, Seccomp, agent_spec, build_images, enricher_spec, inventory_spec,
    unique_name,
};
use flowlog_record::{
    Attribution, Direction, Endpoint, Family, FlowRecord, Identity, IdentityKind, Outcome, avro,
    enriched_avro,
};
use flowlog_testkit::{Topic, free_port, now_ns, pyarrow, temp_dir};
use rdkafka::{
    ClientConfig,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};
use serde_json::Value;

/// The log line that says the agent (or the one-host binary) has attached its programs.
const CAPTURING: &str = "capturing TCP flows";

/// A start that fails must fail this fast (the agent's own part is well under a second; the
/// rest is podman's).
const FAILS_WITHIN: Duration = Duration::from_secs(15);

/// The capability bits of the agent's spec: exactly these, and nothing else, must be in the
/// agent's effective, permitted and bounding sets.
const BPF_AND_PERFMON: u64 = (1 << 38) | (1 << 39);

/// One connection on loopback: the client sends `up` bytes and shuts down its side, the server
/// reads to the end, answers `down` bytes and closes. Returns (client, server) addresses.
fn transfer(server: &TcpListener, up: usize, down: usize) -> (SocketAddr, SocketAddr) {
    let addr = server.local_addr().unwrap();
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&vec![b'u'; up]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), down, "response bytes");
        s.local_addr().unwrap()
    });
    let (mut conn, peer) = server.accept().unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), up, "request bytes");
    conn.write_all(&vec![b'd'; down]).unwrap();
    drop(conn);
    let client = client.join().unwrap();
    assert_eq!(client, peer);
    (client, addr)
}

/// A field of a `/proc/<pid>/status` text.
fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in\n{status}"))
        .trim()
}

fn capability_set(status: &str, field: &str) -> u64 {
    u64::from_str_radix(status_field(status, field), 16).unwrap()
}

/// The JSON-lines records in `path` (complete lines only).
fn records(path: &Path) -> Vec<FlowRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("record {l}: {e}")))
        .collect()
}

#[test]
fn the_agent_image_with_the_daemonsets_privileges_records_exact_flows() {
    build_images().unwrap();
    let spool = temp_dir("images-agent");
    let pins = bpffs_dir("images-agent");
    let spec = agent_spec()
        .with_host_path("/var/lib/flowlog", &spool)
        .with_host_path("/sys/fs/bpf", &pins);
    let host = "images-agent";
    let mut agent = Container::start(
        &unique_name("agent"),
        &spec,
        &[
            "--output",
            "file:/var/lib/flowlog/out.jsonl",
            "--host",
            host,
            "--interim",
            "1h",
        ],
    )
    .unwrap();
    agent.wait_for_line(CAPTURING).unwrap();
    // Pinning in bpffs needs no capability beyond the spec's (deploy/CAPABILITIES.md).
    assert!(
        agent.stderr().contains("pinned the kernel state"),
        "the agent pins with the DaemonSet's privileges:\n{}",
        agent.stderr()
    );

    // What the kernel gave the agent's process: the spec's privileges and nothing more.
    let status = agent.host_status().unwrap();
    assert_eq!(status_field(&status, "Uid"), "0\t0\t0\t0", "{status}");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            capability_set(&status, set),
            BPF_AND_PERFMON,
            "{set}: {status}"
        );
    }
    assert_eq!(capability_set(&status, "CapAmb"), 0, "{status}");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(status_field(&status, "Seccomp"), "2", "{status}");

    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let sizes = [(1, 1), (123_457, 65_536), (0, 0), (300_000, 7)];
    let flows: Vec<_> = sizes
        .iter()
        .map(|&(up, down)| (transfer(&server, up, down), (up as u64, down as u64)))
        .collect();
    let ours = |r: &FlowRecord| {
        flows.iter().any(|&((client, server), _)| {
            let local = SocketAddr::new(r.local_addr, r.local_port);
            let remote = SocketAddr::new(r.remote_addr, r.remote_port);
            (local, remote) == (client, server) || (local, remote) == (server, client)
        })
    };
    let output = spool.join("out.jsonl");
    let deadline = Instant::now() + PATIENCE;
    while records(&output).into_iter().filter(ours).count() < 2 * flows.len() {
        assert!(
            Instant::now() < deadline,
            "records did not arrive: {:#?}\nagent:\n{}",
            records(&output)
                .into_iter()
                .filter(ours)
                .collect::<Vec<_>>(),
            agent.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let exit = agent.stop().unwrap();
    assert!(exit.success(), "agent exit {exit}:\n{}", agent.stderr());

    let records: Vec<FlowRecord> = records(&output).into_iter().filter(ours).collect();
    assert_eq!(records.len(), 2 * flows.len(), "{records:#?}");
    for &((client, server), (up, down)) in &flows {
        let one = |local: SocketAddr, remote: SocketAddr| {
            let found: Vec<&FlowRecord> = records
                .iter()
                .filter(|r| {
                    (r.local_addr, r.local_port, r.remote_addr, r.remote_port)
                        == (local.ip(), local.port(), remote.ip(), remote.port())
                })
                .collect();
            assert_eq!(found.len(), 1, "{local} → {remote}: {found:#?}");
            found[0]
        };
        let out = one(client, server);
        let inb = one(server, client);
        for r in [out, inb] {
            assert_eq!(r.host, host);
            assert_eq!(r.family, Family::Ipv4);
            assert_eq!(r.outcome, Outcome::Closed, "{r:#?}");
            assert_eq!(r.seq, 0, "{r:#?}");
            assert_eq!((r.resets_sent, r.resets_received), (0, 0), "{r:#?}");
        }
        assert_eq!(out.direction, Direction::Outbound);
        assert_eq!(inb.direction, Direction::Inbound);
        assert_eq!((out.bytes_sent, out.bytes_received), (up, down), "{out:#?}");
        assert_eq!((inb.bytes_sent, inb.bytes_received), (down, up), "{inb:#?}");
        // The kernel's pid of the connecting thread: this test process, outside the container.
        assert_eq!(out.pid, Some(std::process::id()), "{out:#?}");
    }
    let _ = std::fs::remove_dir_all(spool);
    let _ = std::fs::remove_dir_all(pins);
}

/// A directory of the test's own on the host's bpffs, mounted as the agent's /sys/fs/bpf, so
/// that what the agent pins (in its `flowlog` directory) is the test's to remove.
fn bpffs_dir(what: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/sys/fs/bpf/{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (is bpffs mounted?)", dir.display()));
    dir
}

/// Runs the agent image with `spec` and returns its stderr and how long it took to fail.
fn failed_start(spec: &podman::ContainerSpec, what: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut agent = Container::start(&unique_name(what), spec, &["--interim", "1h"]).unwrap();
    let exit = agent.wait(PATIENCE).unwrap();
    let took = started.elapsed();
    let stderr = agent.stderr();
    assert!(!exit.success(), "{what}: the agent started:\n{stderr}");
    assert!(
        !stderr.contains(CAPTURING),
        "{what}: the agent started:\n{stderr}"
    );
    eprintln!("{what}: failed in {:.1} s", took.as_secs_f64());
    (stderr, took)
}

#[test]
fn the_agent_image_without_any_one_capability_fails_at_start_naming_it() {
    build_images().unwrap();
    let spool = temp_dir("images-agent-caps");
    let pins = bpffs_dir("images-agent-caps");
    for cap in agent_spec().capabilities {
        let spec = agent_spec()
            .with_host_path("/var/lib/flowlog", &spool)
            .with_host_path("/sys/fs/bpf", &pins)
            .without_capability(&cap);
        let (stderr, took) = failed_start(&spec, &format!("agent-no-{}", cap.to_lowercase()));
        assert!(
            stderr.contains(&format!(
                "this process lacks CAP_{cap}, which the agent needs"
            )),
            "without {cap}: the error does not name it:\n{stderr}"
        );
        assert!(
            took < FAILS_WITHIN,
            "without {cap}: took {took:?} to fail:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(spool);
    let _ = std::fs::remove_dir_all(pins);
}

#[test]
fn the_agent_image_under_a_seccomp_profile_that_refuses_bpf_says_so() {
    build_images().unwrap();
    let spool = temp_dir("images-agent-seccomp");
    let pins = bpffs_dir("images-agent-seccomp");
    let mut spec = agent_spec()
        .with_host_path("/var/lib/flowlog", &spool)
        .with_host_path("/sys/fs/bpf", &pins);
    spec.seccomp = Seccomp::PodmanDefault;
    let (stderr, took) = failed_start(&spec, "agent-podman-seccomp");
    assert!(
        stderr.contains("a seccomp filter is on the process"),
        "the error does not name seccomp:\n{stderr}"
    );
    assert!(took < FAILS_WITHIN, "took {took:?} to fail:\n{stderr}");
    let _ = std::fs::remove_dir_all(spool);
    let _ = std::fs::remove_dir_all(pins);
}

/// Produces `record` (Avro, schema id 1, keyed as the agent keys it) to `topic`.
fn produce(topic: &Topic, record: &FlowRecord) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &topic.brokers)
        .set("linger.ms", "5")
        .create()
        .expect("creating the test producer");
    let mut value = Vec::new();
    avro::encode(record, avro::DEFAULT_SCHEMA_ID, &mut value);
    let key = avro::key(record);
    producer
        .send(BaseRecord::to(&topic.name).key(&key).payload(&value))
        .map_err(|(e, _)| e)
        .expect("queueing the flow record");
    producer
        .flush(PATIENCE)
        .expect("delivering the flow record");
}

/// Checks that the container runs as the manifests' unprivileged user with no capability.
fn assert_unprivileged(container: &Container) {
    let status = container.host_status().unwrap();
    assert_eq!(
        status_field(&status, "Uid"),
        "65532\t65532\t65532\t65532",
        "{}: {status}",
        container.name
    );
    assert_eq!(
        status_field(&status, "Gid"),
        "65532\t65532\t65532\t65532",
        "{}: {status}",
        container.name
    );
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(
            capability_set(&status, set),
            0,
            "{}: {set}: {status}",
            container.name
        );
    }
}

#[test]
fn the_enricher_and_inventory_images_unprivileged_enrich_a_record_end_to_end() {
    build_images().unwrap();
    const OUT_ID: u32 = 7;
    let (raw, enriched, dlq, ownership) = (
        Topic::create("images-raw", 1),
        Topic::create("images-enriched", 1),
        Topic::create("images-dlq", 1),
        Topic::create("images-ownership", 1),
    );
    let dir = temp_dir("images-inventory");
    let inventory = dir.join("static.toml");
    std::fs::write(
        &inventory,
        "[[entry]]\ncidr = \"192.0.2.10\"\nname = \"host-a\"\nkind = \"host\"\n\
         namespace = \"corp\"\nlabels = { site = \"hq\" }\n\n\
         [[entry]]\ncidr = \"10.5.0.1\"\nname = \"db\"\nkind = \"instance\"\n",
    )
    .unwrap();
    // The manifests mount the static file from a ConfigMap; here, the file itself, read-only.
    let mut spec = inventory_spec();
    spec.mounts.push(podman::Mount {
        host: inventory.clone(),
        container: "/etc/flowlog/static.toml".into(),
        read_only: true,
    });
    // The broker listens on the host's loopback.
    spec.host_network = true;
    let mut publisher = Container::start(
        &unique_name("inventory"),
        &spec,
        &[
            "--brokers",
            &ownership.brokers,
            "--ownership-topic",
            &ownership.name,
            "--static",
            "/etc/flowlog/static.toml",
            "--static-interval",
            "200ms",
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()),
        ],
    )
    .unwrap();
    publisher.wait_for_line("publishing ownership").unwrap();
    assert_unprivileged(&publisher);

    let mut spec = enricher_spec();
    spec.host_network = true;
    let mut enricher = Container::start(
        &unique_name("enricher"),
        &spec,
        &[
            "--brokers",
            &raw.brokers,
            "--input-topic",
            &raw.name,
            "--output-topic",
            &enriched.name,
            "--dlq-topic",
            &dlq.name,
            "--group",
            &flowlog_testkit::unique_name("images-group"),
            "--ownership-topic",
            &ownership.name,
            "--output-schema-id",
            &OUT_ID.to_string(),
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()),
        ],
    )
    .unwrap();
    enricher.wait_for_line("enriching").unwrap();
    assert_unprivileged(&enricher);

    let start_ns = now_ns() - 60_000_000_000;
    let record = FlowRecord {
        flow_id: 0x0123_4567_89ab_cdef,
        host: "host-a".to_owned(),
        start_ns,
        end_ns: start_ns + 1_500_000,
        local_addr: "192.0.2.10".parse().unwrap(),
        local_port: 43_210,
        remote_addr: "10.5.0.1".parse().unwrap(),
        remote_port: 5432,
        bytes_sent: 1_234,
        bytes_received: 56_789,
        segs_sent: 12,
        segs_received: 45,
        retransmits: 1,
        srtt_us: 250,
        min_rtt_us: 180,
        pid: Some(4242),
        comm: Some("psql".to_owned()),
        cgroup_id: Some(77),
        ..FlowRecord::default()
    };
    let produced_ns = now_ns();
    produce(&raw, &record);
    let messages = enriched.read_until(|m| !m.is_empty());
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    use rdkafka::Message as _;
    assert_eq!(message.key(), Some(&avro::key(&record)[..]), "message key");
    let flow = enriched_avro::decode_expecting(message.payload().unwrap(), OUT_ID)
        .expect("an enriched flow");
    assert!(
        (produced_ns..=now_ns()).contains(&flow.enriched_ns),
        "enriched_ns {} outside the test's run",
        flow.enriched_ns
    );
    let host_a = Identity {
        kind: IdentityKind::Host,
        name: "host-a".to_owned(),
        namespace: Some("corp".to_owned()),
        labels: [("site".to_owned(), "hq".to_owned())].into(),
        source: "static".to_owned(),
        ..Identity::default()
    };
    let db = Identity {
        kind: IdentityKind::Instance,
        name: "db".to_owned(),
        source: "static".to_owned(),
        ..Identity::default()
    };
    assert_eq!(flow.flow, record);
    assert_eq!(flow.local, Endpoint::exact(host_a.into()));
    assert_eq!(flow.remote, Endpoint::exact(db.into()));
    assert_eq!(flow.remote.status, Attribution::Exact);

    for container in [&mut enricher, &mut publisher] {
        let exit = container.stop().unwrap();
        assert!(
            exit.success(),
            "{} exit {exit}:\n{}",
            container.name,
            container.stderr()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The cgroup v2 hierarchy's mount point on this host (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts such as this VM).
fn cgroup2_mount() -> String {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            (fs.split(' ').next() == Some("cgroup2")).then(|| mount.split(' ').nth(4))?
        })
        .expect("a cgroup2 mount")
        .to_owned()
}

#[test]
fn the_one_host_image_captures_into_parquet() {
    build_images().unwrap();
    let dir = temp_dir("images-flowlog");
    let host = "images-flowlog";
    // The agent's privileges and mounts, plus what the one-host inventory reads: the host's
    // network (its interface addresses) and its cgroup v2 hierarchy (the local end's
    // container); Parquet goes to the working directory /var/lib/flowlog.
    let mut spec = flowlog_deploy::podman::flowlog_spec(&cgroup2_mount())
        .with_host_path("/var/lib/flowlog", &dir);
    spec.env.push(("FLOWLOG_HOST".to_owned(), host.to_owned()));
    let mut flowlog = Container::start(
        &unique_name("flowlog"),
        &spec,
        &[
            "--summary-interval",
            "1s",
            "--hold",
            "2s",
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()),
        ],
    )
    .unwrap();
    flowlog.wait_for_line(CAPTURING).unwrap();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = transfer(&server, 4_321, 98_765);
    // A summary interval passes with the flow in it.
    thread::sleep(Duration::from_millis(2500));
    let exit = flowlog.stop().unwrap();
    assert!(exit.success(), "flowlog exit {exit}:\n{}", flowlog.stderr());
    assert!(
        flowlog.stdout().contains("flows/s"),
        "no live summary:\n{}",
        flowlog.stdout()
    );

    let read: Value = serde_json::from_str(&pyarrow(&[
        "read",
        &dir.join("flowlogs").display().to_string(),
    ]))
    .expect("the reader's JSON");
    let rows: Vec<Value> = read["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["rows"].as_array().unwrap().clone())
        .collect();
    let out: Vec<&Value> = rows
        .iter()
        .filter(|r| r["local_port"] == client.port() && r["remote_port"] == server.port())
        .collect();
    assert_eq!(out.len(), 1, "{out:?}");
    let out = out[0];
    assert_eq!(out["direction"], "outbound");
    assert_eq!(out["outcome"], "closed");
    assert_eq!(out["host"], host);
    assert_eq!(
        (out["bytes_sent"].as_u64(), out["bytes_received"].as_u64()),
        (Some(4_321), Some(98_765))
    );
    assert_eq!(out["remote"]["status"], "exact", "{out}");
    assert_eq!(out["remote"]["name"], host, "{out}");
    assert_eq!(out["local"]["status"], "exact", "{out}");
    let _ = std::fs::remove_dir_all(dir);
}
