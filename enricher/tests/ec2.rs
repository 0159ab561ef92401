//! The hold policy per source, end to end: `flowlog-enricher` reading a static file and EC2
//! (moto, `FLOWLOG_TEST_EC2`, started by `scripts/moto start`; a VPC of the test's own with
//! instances at explicit addresses) polled every 5 s, with `--hold 1s` — shorter than the poll
//! interval — on the test broker (`FLOWLOG_TEST_KAFKA`). Just after a poll, flows start: one to
//! an instance's address waits for EC2's next poll (longer than the hold) and comes out `exact`;
//! one to an ENI moved to another instance between the two polls comes out `ambiguous` naming
//! both; one to the static range goes out without waiting for EC2. The same through
//! `flowlog-inventory` and the ownership topic. Latencies are read from each enriched flow's own
//! `enriched_ns` against the flows' start.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

// The moto fixture of flowlog-ec2's own tests (a VPC of the test's own, instances and ENIs at
// explicit addresses, all removed on drop), shared rather than copied.
#[path = "../../flowlog-ec2/tests/common/mod.rs"]
mod ec2;

use ec2::{Fixture, REGION, endpoint};
use flowlog_record::{Attribution, EnrichedFlow, FlowRecord, avro, enriched_avro};
use flowlog_testkit::{
    ChildGuard, PATIENCE, Topic, cargo_bin, free_port, http_get, now_ns, runtime, spawn_ready,
    temp_dir, unique_name,
};
use rdkafka::Message;

const ENRICHER: &str = env!("CARGO_BIN_EXE_flowlog-enricher");
/// `flowlog-inventory`, a binary of another package: cargo gives a test only its own package's
/// binaries, so the testkit builds it (once per test process, up to date, this test's profile).
fn inventory_bin() -> PathBuf {
    cargo_bin("flowlog-inventory")
}
const OUT_ID: u32 = 7;
const INTERVAL: Duration = Duration::from_secs(5);
const HOLD: Duration = Duration::from_secs(1);

/// One test at a time: tansu 0.6 loses partitions from its metadata when topics are created and
/// deleted while a consumer group rebalances (see tests/pipeline.rs).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A flow record to `remote` started at `start_ns`.
fn record(flow_id: u64, remote: &str, start_ns: u64) -> FlowRecord {
    FlowRecord {
        flow_id,
        host: "host-a".to_owned(),
        start_ns,
        end_ns: start_ns + 1_000_000,
        local_addr: "192.0.2.10".parse().unwrap(),
        local_port: 40_000 + flow_id as u16,
        remote_addr: remote.parse().unwrap(),
        remote_port: 443,
        bytes_sent: 1,
        bytes_received: 1,
        segs_sent: 2,
        segs_received: 2,
        srtt_us: 100,
        min_rtt_us: 100,
        ..FlowRecord::default()
    }
}

fn produce(topic: &Topic, records: &[FlowRecord]) {
    let messages: Vec<(Vec<u8>, Vec<u8>)> = records
        .iter()
        .map(|r| {
            let mut value = Vec::new();
            avro::encode(r, avro::DEFAULT_SCHEMA_ID, &mut value);
            (avro::key(r), value)
        })
        .collect();
    topic.produce(&messages);
}

/// A command with moto's credentials and region, and nothing of the machine's AWS set-up.
fn with_aws(command: &mut Command) -> &mut Command {
    command
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env("FLOWLOG_LOG", "info")
}

/// The value of the gauge `flowlog_enricher_source_lag_seconds{source="<source>"}`.
fn source_lag(metrics: SocketAddr, source: &str) -> Option<f64> {
    let (_, page) = http_get(metrics, "/metrics").ok()?;
    let prefix = format!("flowlog_enricher_source_lag_seconds{{source=\"{source}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

/// The sum of counter `name` over the series whose labels include `labels`.
fn counter(metrics: SocketAddr, name: &str, labels: &str) -> f64 {
    let (_, page) = http_get(metrics, "/metrics").unwrap();
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until EC2 has just polled: its lag gauge (set every second) read below 1 s after it
/// had grown past 2 s (or before the first poll, +Inf).
fn just_after_a_poll(metrics: SocketAddr, source: &str) {
    let deadline = Instant::now() + PATIENCE;
    let mut was_behind = false;
    loop {
        match source_lag(metrics, source) {
            Some(lag) if lag > 2.0 => was_behind = true,
            Some(lag) if lag < 1.0 && was_behind => return,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no EC2 poll seen within {PATIENCE:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn remote(flow: &EnrichedFlow) -> (Attribution, String) {
    let who = match &flow.remote.identity {
        Some(i) => i.name.clone(),
        None => flow.remote.candidates.join(","),
    };
    (flow.remote.status, who)
}

/// Runs the scenario with the sources read by the enricher itself, or through
/// `flowlog-inventory` and the ownership topic (`via_topic`).
fn ec2_flows_wait_for_the_next_poll_and_others_do_not(via_topic: bool, net: u8) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let inventory = via_topic.then(inventory_bin);
    let endpoint = endpoint();
    let rt = runtime();
    let mut fx = rt.block_on(Fixture::new(
        &endpoint,
        &format!("10.{net}.0.0/16"),
        &format!("10.{net}.1.0/24"),
    ));
    let (a_ip, b_ip, moving_ip) = (
        format!("10.{net}.1.10"),
        format!("10.{net}.1.11"),
        format!("10.{net}.1.50"),
    );
    let (a, b, moving) = rt.block_on(async {
        let a = fx.instance(&a_ip, &[("Name", "web-a")]).await;
        let b = fx.instance(&b_ip, &[("Name", "web-b")]).await;
        let moving = fx.eni(&moving_ip).await;
        (a, b, moving)
    });
    let attachment = rt.block_on(fx.attach(&moving, &a));
    let dir = temp_dir("ec2-hold");
    let static_file = dir.join("static.toml");
    std::fs::write(
        &static_file,
        "[[entry]]\ncidr = \"10.77.0.0/16\"\nname = \"office\"\n",
    )
    .unwrap();
    let static_file = static_file.display().to_string();
    let interval = format!("{}s", INTERVAL.as_secs());
    let source_flags = [
        "--static",
        &static_file,
        "--static-interval",
        "200ms",
        "--ec2",
        "--ec2-endpoint",
        &endpoint,
        "--ec2-region",
        REGION,
        "--ec2-vpc",
        &fx.vpc,
        "--ec2-interval",
        &interval,
    ];
    let (raw, enriched, dlq) = (
        Topic::create("ec2-raw", 1),
        Topic::create("ec2-enriched", 1),
        Topic::create("ec2-dlq", 1),
    );
    let ownership = via_topic.then(|| Topic::create("ec2-ownership", 1));
    let _inventory: Option<ChildGuard> =
        ownership
            .as_ref()
            .zip(inventory)
            .map(|(ownership, inventory)| {
                spawn_ready(
                    with_aws(&mut Command::new(inventory))
                        .args(["--brokers", &ownership.brokers])
                        .args(["--ownership-topic", &ownership.name])
                        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
                        .args(source_flags),
                    "inventory",
                    "publishing ownership",
                )
            });
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut enricher = Command::new(ENRICHER);
    with_aws(&mut enricher)
        .args(["--brokers", &raw.brokers, "--input-topic", &raw.name])
        .args(["--output-topic", &enriched.name, "--dlq-topic", &dlq.name])
        .args(["--group", &unique_name("ec2-group")])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--output-schema-id", &OUT_ID.to_string()])
        .args(["--hold", &format!("{}s", HOLD.as_secs())])
        .args(["--consumer-option", "fetch.wait.max.ms=10"]);
    match &ownership {
        Some(ownership) => enricher.args(["--ownership-topic", &ownership.name]),
        None => enricher.args(source_flags),
    };
    let mut enricher = spawn_ready(&mut enricher, "enricher", "enriching");
    let ec2 = if via_topic { "ownership/ec2" } else { "ec2" };
    just_after_a_poll(metrics, ec2);

    let t0 = now_ns();
    produce(&raw, &[record(1, &a_ip, t0), record(2, "10.77.0.9", t0)]);
    // The ENI moves from web-a to web-b; a flow to it starts after the move, before the poll
    // that will see it.
    rt.block_on(async {
        fx.detach(&attachment).await;
        fx.attach(&moving, &b).await;
    });
    let t1 = now_ns();
    produce(&raw, &[record(3, &moving_ip, t1)]);

    let messages = enriched.read_until(|m| m.len() >= 3);
    let out: Vec<EnrichedFlow> = messages
        .iter()
        .map(|m| enriched_avro::decode_expecting(m.payload().unwrap(), OUT_ID).unwrap())
        .collect();
    let get = |id: u64| out.iter().find(|f| f.flow.flow_id == id).unwrap();
    let waited =
        |f: &EnrichedFlow| Duration::from_nanos(f.enriched_ns.saturating_sub(f.flow.start_ns));
    let (office, at_a, moved) = (get(2), get(1), get(3));
    eprintln!(
        "latency: office {:?}, web-a {:?}, moved ENI {:?}",
        waited(office),
        waited(at_a),
        waited(moved)
    );
    assert_eq!(remote(office), (Attribution::Exact, "office".into()));
    assert_eq!(remote(at_a), (Attribution::Exact, "web-a".into()));
    assert_eq!(
        remote(moved),
        (Attribution::Ambiguous, "web-a,web-b".into()),
        "moved between the polls: either owner"
    );
    // Not delayed by EC2: out well before EC2's next poll.
    assert!(
        waited(office) < Duration::from_millis(1_500),
        "the static flow waited {:?}",
        waited(office)
    );
    // EC2's flows waited past the hold for the next poll, and no longer than the interval +
    // hold (+ a second for the pipeline).
    for f in [at_a, moved] {
        assert!(
            waited(f) > HOLD && waited(f) < INTERVAL + HOLD + Duration::from_secs(1),
            "flow {} waited {:?}",
            f.flow.flow_id,
            waited(f)
        );
    }
    assert!(waited(office) < waited(at_a));
    assert_eq!(
        counter(
            metrics,
            "flowlog_enricher_waits_total",
            &format!("source=\"{ec2}\"")
        ),
        2.0,
        "the two flows to EC2 addresses waited for EC2"
    );
    assert_eq!(
        counter(metrics, "flowlog_enricher_hold_expired_total", ""),
        0.0
    );
    assert!(enricher.terminate(PATIENCE));
    drop(fx);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn flows_to_ec2_addresses_wait_for_the_next_poll_and_others_do_not() {
    ec2_flows_wait_for_the_next_poll_and_others_do_not(false, 95);
}

#[test]
fn through_the_ownership_topic_flows_wait_for_ec2_only_where_it_could_change_them() {
    ec2_flows_wait_for_the_next_poll_and_others_do_not(true, 96);
}
