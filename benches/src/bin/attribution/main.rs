//! `attribution`: how often a flow is attributed to the wrong pod when pod addresses are reused
//! within seconds (issue 6's headline figure). Run it through `benches/attribution`; it is not
//! a test.
//!
//! The real pipeline, as deployed, with real processes: a Kubernetes list/watch server
//! (`flowlog_testkit::kubernetes`, real object JSON over HTTP, which the `kube` client watches
//! unchanged) → `flowlog-inventory --kubernetes-url` → the `flows.ownership` topic on a real
//! Kafka-protocol broker → `flowlog-enricher --ownership-topic`, fed flow records on its input
//! topic and read back from its output topic. Each of `--addresses` pod addresses is handed
//! from pod to pod for `--duration` (`flowlog_testkit::pod_churn`); flows start just after an open, just before
//! a close, in the gap between owners, across a reassignment, and within `--near` either side of
//! an open or a close. With `--watch-lag random` the server delivers every watch message a random
//! 0–`--watch-lag-max` late (each stream in order, as an API server under load does); with
//! `--watch-lag bursts` only the messages of periodic bursts. Every flow is scored twice
//! against the API server's own record of who held the address when the flow started:
//! flowlog's answer (as of the flow's start), and a latest-owner lookup made when the flow's
//! record is exported — given the cluster's true current state with zero lag, the best case
//! for that design.
// The churn harness's reading of /proc, shared rather than copied.
#[allow(dead_code)]
#[path = "../churn/procfs.rs"]
mod procfs;

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use flowlog_enricher::ownership::OwnershipRecord;
use flowlog_record::{IdentityKind, avro, enriched_avro};
use flowlog_testkit::{
    ChildGuard, Topic, free_port,
    kubernetes::{ApiServer, Kind, WatchLag, node},
    pod_churn::{
        self, Placement, Scenario, SentFlow, Shape, Truth,
        score::{Answer, FLOWLOG, LATEST, Score, Tally, quantile, share},
    },
    spawn_ready, unique_name,
};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

/// Target from the issue: at most this share of flows with an owner come out unknown.
const MAX_UNKNOWN_SHARE: f64 = 0.001;
/// Target from the issue: at most this share of all flows come out ambiguous.
const MAX_AMBIGUOUS_SHARE: f64 = 0.005;

/// How the list/watch server delays its watch streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LagMode {
    /// Every watch message on time.
    None,
    /// Every watch message held a random 0–`--watch-lag-max`, each stream in order.
    Random,
    /// Messages written during bursts (`--burst-length` of every `--burst-every`) held a random
    /// 0–`--watch-lag-max`, in order.
    Bursts,
}
/// The enricher's output schema id (any registered id; the harness decodes with it).
const OUTPUT_SCHEMA_ID: u32 = 2;

/// Attribution accuracy under pod address churn, flowlog against a latest-owner lookup.
#[derive(Debug, Parser)]
struct Args {
    /// The release build of flowlog-inventory.
    #[arg(long)]
    inventory: PathBuf,
    /// The release build of flowlog-enricher.
    #[arg(long)]
    enricher: PathBuf,
    /// Kafka bootstrap servers (topics of the run's own are created and deleted).
    #[arg(long, env = "FLOWLOG_BENCH_KAFKA", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Pod addresses that change hands.
    #[arg(long, default_value_t = 1000)]
    addresses: u32,
    /// How long addresses change hands.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Shortest time a pod holds its address.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    tenure_min: Duration,
    /// Longest time a pod holds its address.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    tenure_max: Duration,
    /// Shortest time an address stays free between two pods.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    gap_min: Duration,
    /// Longest time an address stays free between two pods.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    gap_max: Duration,
    /// Closest a "just after" / "just before" flow starts to the open / close.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    offset_min: Duration,
    /// Farthest a "just after" / "just before" flow starts from the open / close.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    offset_max: Duration,
    /// Flows also start within this either side of every open and close (0: none).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    near: Duration,
    /// How the list/watch server delays its watch streams.
    #[arg(long, value_enum, default_value_t = LagMode::None)]
    watch_lag: LagMode,
    /// Longest a watch message is held back (`--watch-lag random` or `bursts`).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    watch_lag_max: Duration,
    /// `--watch-lag bursts`: a burst starts this often...
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    burst_every: Duration,
    /// ... and lasts this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    burst_length: Duration,
    /// One more argument for flowlog-inventory (repeat the flag for several), e.g.
    /// `--inventory-arg=--kubernetes-probe-interval=100ms`.
    #[arg(long, allow_hyphen_values = true)]
    inventory_arg: Vec<String>,
    /// From a flow's end to its record on the input topic (the agent's batching).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    export_delay: Duration,
    /// The enricher's hold: how long a flow newer than the inventory waits for it.
    #[arg(long, default_value = "5s")]
    hold: String,
    /// Seed of the scenario's random times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Which flowlog code was measured (for the report).
    #[arg(long, default_value = "unknown")]
    revision: String,
}

/// What the enricher wrote for each flow: its remote end's answer.
#[derive(Default)]
struct Enriched {
    answers: HashMap<u64, Answer>,
    /// Messages for a flow already seen (at-least-once delivery), and how many disagreed.
    duplicates: u64,
    conflicting: u64,
    undecodable: u64,
}

/// Reads the enricher's output topic in a thread until `stop`.
fn read_enriched(
    topic: &Topic,
    into: Arc<Mutex<Enriched>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<thread::JoinHandle<()>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &topic.brokers)
        .set("group.id", unique_name("attribution-reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the output topic's consumer")?;
    consumer
        .subscribe(&[&topic.name])
        .context("subscribing to the output topic")?;
    Ok(thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let Ok(message) = message else { continue };
            let mut enriched = into.lock().unwrap();
            let Ok(flow) =
                enriched_avro::decode_expecting(message.payload().unwrap_or(&[]), OUTPUT_SCHEMA_ID)
            else {
                enriched.undecodable += 1;
                continue;
            };
            let answer = Answer::of(&flow.remote);
            match enriched.answers.insert(flow.flow.flow_id, answer.clone()) {
                None => {}
                Some(before) => {
                    enriched.duplicates += 1;
                    if before != answer {
                        enriched.conflicting += 1;
                    }
                }
            }
        }
    }))
}

/// The inventory's stamps of each pod's tenure, from the ownership topic: pod → (from, to).
type Stamps = HashMap<String, (u64, Option<u64>)>;

/// Reads the whole ownership topic: the tenures the inventory published for pods, and the
/// widths of its uncertain spans for pods (ms, sorted).
fn ownership_stamps(topic: &Topic) -> anyhow::Result<(Stamps, Vec<i64>)> {
    let mut stamps = Stamps::new();
    let mut spans = Vec::new();
    for message in topic.read_all() {
        let Some(payload) = message.payload() else {
            continue;
        };
        let record: OwnershipRecord =
            serde_json::from_slice(payload).context("decoding an ownership record")?;
        if let OwnershipRecord::Uncertain {
            identity,
            from_ns,
            to_ns,
            ..
        } = &record
            && identity.kind == IdentityKind::Pod
        {
            spans.push(((to_ns - from_ns) / 1_000_000) as i64);
        }
        if let OwnershipRecord::Tenure {
            identity,
            from_ns,
            to_ns,
            ..
        } = record
            && identity.kind == IdentityKind::Pod
        {
            let entry = stamps
                .entry(identity.name.clone())
                .or_insert((from_ns, None));
            if to_ns.is_some() {
                entry.1 = to_ns;
            }
        }
    }
    spans.sort_unstable();
    Ok((stamps, spans))
}

/// How much later than the API server's write the inventory stamped each open and close (ms),
/// sorted.
struct Lag {
    opens: Vec<i64>,
    closes: Vec<i64>,
    /// Widths of the uncertain spans the inventory sent with pods' changes (ms, sorted).
    spans: Vec<i64>,
}

fn inventory_lag(stamps: &Stamps, truth: &Truth) -> anyhow::Result<Lag> {
    let mut lag = Lag {
        opens: Vec::new(),
        closes: Vec::new(),
        spans: Vec::new(),
    };
    let by_pod = truth.by_pod();
    let ms = |stamp: u64, truth: u64| (stamp as i64 - truth as i64) / 1_000_000;
    for (pod, (from, to)) in stamps {
        let Some(tenure) = by_pod.get(pod.as_str()) else {
            bail!("the inventory published a pod the scenario never made: {pod}");
        };
        lag.opens.push(ms(*from, tenure.from_ns));
        if let (Some(to), Some(truth_to)) = (to, tenure.to_ns) {
            lag.closes.push(ms(*to, truth_to));
        }
    }
    lag.opens.sort_unstable();
    lag.closes.sort_unstable();
    Ok(lag)
}

/// One wrong answer of flowlog's, explained on stderr: where the flow started against the
/// truth and against the inventory's stamps of the address's tenures.
fn explain(flow: &SentFlow, answer: &Answer, truth: &Truth, stamps: &Stamps) {
    let ms = |t: u64| (t as i64 - flow.start_ns as i64) as f64 / 1e6;
    let mut line = format!(
        "attribution: wrong: {:?} flow to {} answered {answer:?}; tenures relative to its start (truth → inventory stamp, ms):",
        flow.placement,
        pod_churn::address(flow.address),
    );
    for t in &truth.tenures[flow.address as usize] {
        if t.to_ns
            .is_some_and(|to| to + 10_000_000_000 < flow.start_ns)
            || t.from_ns > flow.start_ns + 10_000_000_000
        {
            continue;
        }
        let (from, to) = stamps.get(&t.pod).copied().unwrap_or((0, None));
        let _ = write!(
            line,
            " {} [{:.1}→{:.1}, {}→{})",
            t.pod,
            ms(t.from_ns),
            ms(from),
            t.to_ns.map_or("open".into(), |v| format!("{:.1}", ms(v))),
            to.map_or("open".into(), |v| format!("{:.1}", ms(v))),
        );
    }
    eprintln!("{line}");
}

/// One counter or gauge from a Prometheus endpoint, summed over its label sets (0 if the
/// endpoint has never registered it; None if the endpoint did not answer).
fn scrape(addr: &str, name: &str) -> Option<f64> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    let values: Vec<f64> = body
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    body.starts_with("HTTP/")
        .then(|| values.iter().fold(0.0, |sum, v| sum + v))
}

/// CPU seconds (utime + stime) of a child process.
fn cpu_seconds(child: &ChildGuard) -> anyhow::Result<f64> {
    Ok(procfs::cpu_ticks(child.0.id())? as f64 / procfs::clock_ticks_per_second()? as f64)
}

/// The server's lag mode from the flags.
fn lag(args: &Args) -> WatchLag {
    match args.watch_lag {
        LagMode::None => WatchLag::None,
        LagMode::Random => WatchLag::Random {
            max: args.watch_lag_max,
        },
        LagMode::Bursts => WatchLag::Bursts {
            every: args.burst_every,
            length: args.burst_length,
            max: args.watch_lag_max,
        },
    }
}

/// The lag mode in words, for the report.
fn describe_lag(args: &Args) -> String {
    match args.watch_lag {
        LagMode::None => "watch events delivered at once".to_owned(),
        LagMode::Random => format!(
            "every watch message delivered a random 0–{:?} late, each stream in order",
            args.watch_lag_max
        ),
        LagMode::Bursts => format!(
            "watch messages written in the first {:?} of every {:?} delivered a random 0–{:?} \
             late, each stream in order",
            args.burst_length, args.burst_every, args.watch_lag_max
        ),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shape = Shape {
        addresses: args.addresses,
        duration: args.duration,
        tenure: args.tenure_min..args.tenure_max,
        gap: args.gap_min..args.gap_max,
        offset: args.offset_min..args.offset_max,
        near: args.near,
        export_delay: args.export_delay,
        seed: args.seed,
    };
    if args.offset_max >= args.tenure_min {
        bail!("--offset-max must be shorter than --tenure-min (flows must fall inside a tenure)");
    }
    if args.near >= args.gap_min {
        bail!("--near must be shorter than --gap-min (a flow just before an open is in the gap)");
    }
    let raw = Topic::create_on(&args.brokers, "attribution-raw", 4);
    let enriched = Topic::create_on(&args.brokers, "attribution-enriched", 4);
    let dlq = Topic::create_on(&args.brokers, "attribution-dlq", 1);
    let ownership = Topic::create_on(&args.brokers, "attribution-ownership", 1);

    // The API server runs on a runtime of its own; the churn drives it from this thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = runtime.block_on(ApiServer::start());
    server.apply(
        Kind::Node,
        node("node-1", "node-uid", "192.0.2.1", None, "zone-a"),
    );
    server.set_watch_lag(lag(&args), args.seed);
    let inventory_metrics = format!("127.0.0.1:{}", free_port());
    let inventory = spawn_ready(
        Command::new(&args.inventory)
            .args(["--brokers", &args.brokers])
            .args(["--ownership-topic", &ownership.name])
            .args(["--kubernetes-url", &server.url])
            .args(["--metrics-addr", &inventory_metrics])
            .args(&args.inventory_arg),
        "flowlog-inventory",
        "publishing ownership",
    );
    let enricher_metrics = format!("127.0.0.1:{}", free_port());
    let enricher = spawn_ready(
        Command::new(&args.enricher)
            .args(["--brokers", &args.brokers])
            .args(["--input-topic", &raw.name, "--output-topic", &enriched.name])
            .args([
                "--dlq-topic",
                &dlq.name,
                "--group",
                &unique_name("attribution"),
            ])
            .args(["--ownership-topic", &ownership.name, "--hold", &args.hold])
            .args(["--output-schema-id", &OUTPUT_SCHEMA_ID.to_string()])
            .args(["--metrics-addr", &enricher_metrics]),
        "flowlog-enricher",
        "enriching",
    );
    let answers = Arc::new(Mutex::new(Enriched::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = read_enriched(&enriched, Arc::clone(&answers), Arc::clone(&stop))?;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "5")
        .create()
        .context("creating the input topic's producer")?;

    eprintln!(
        "attribution: {} addresses changing hands for {:?} (tenures {:?}–{:?}, gaps {:?}–{:?})",
        args.addresses, args.duration, args.tenure_min, args.tenure_max, args.gap_min, args.gap_max
    );
    let started = Instant::now();
    let cpu_before = procfs::HostCpu::read()?;
    let mut value = Vec::with_capacity(256);
    let mut produce_errors = 0u64;
    let truth = Scenario::new(shape.clone(), &server).run(|record| {
        value.clear();
        avro::encode(record, avro::DEFAULT_SCHEMA_ID, &mut value);
        let key = avro::key(record);
        let mut message = BaseRecord::to(&raw.name).key(&key).payload(&value);
        // A full local queue is waited out, never dropped: every planned flow must arrive.
        loop {
            match producer.send(message) {
                Ok(()) => break,
                Err((e, back)) => {
                    produce_errors += 1;
                    if produce_errors == 1 {
                        eprintln!("attribution: producing: {e}; retrying");
                    }
                    message = back;
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    });
    let churn_time = started.elapsed();
    let host = procfs::HostCpu::read()?.since(cpu_before);
    let machine_busy = host.pct(host.busy) / 100.0;
    producer
        .flush(Duration::from_secs(60))
        .context("delivering the flow records")?;
    let sent = truth.flows.len();
    eprintln!("attribution: churn done, {sent} flows sent; waiting for the enricher");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = answers.lock().unwrap().answers.len();
        if got >= sent {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("attribution: only {got} of {sent} flows came out of the enricher");
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let cpu = (cpu_seconds(&inventory)?, cpu_seconds(&enricher)?);
    let hold_expired = scrape(&enricher_metrics, "flowlog_enricher_hold_expired_total");
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the output reader");
    drop(enricher);
    drop(inventory);
    let (stamps, spans) = ownership_stamps(&ownership)?;
    let mut lag = inventory_lag(&stamps, &truth)?;
    lag.spans = spans;
    let enriched = Arc::try_unwrap(answers)
        .ok()
        .expect("the reader has stopped")
        .into_inner()
        .unwrap();

    let mut tally = Tally::default();
    let mut missing = 0u64;
    let mut explained = 0;
    for (flow_id, flow) in &truth.flows {
        let Some(flowlog) = enriched.answers.get(flow_id) else {
            missing += 1;
            continue;
        };
        let latest = Answer::latest(flow.latest_owner.as_ref());
        let owner = truth.owner_at(flow.address, flow.start_ns);
        if !flowlog.is_right(owner) && explained < 20 {
            explained += 1;
            explain(flow, flowlog, &truth, &stamps);
        }
        tally.add(flow.placement, owner, flowlog, &latest);
    }
    print!(
        "{}",
        report(
            &args,
            &truth,
            &tally,
            &enriched,
            missing,
            &lag,
            Load {
                cpu,
                machine_busy,
                churn_time,
            },
            hold_expired
        )
    );
    let flowlog = tally.total(FLOWLOG);
    let unknown_share = flowlog.unknown as f64 / tally.owned_flows().max(1) as f64;
    if missing > 0 {
        bail!("{missing} flows never came out of the enricher");
    }
    eprintln!(
        "attribution: flowlog {} misattributed, unknown {:.4}%",
        flowlog.misattributed,
        unknown_share * 100.0
    );
    Ok(())
}

/// What the run cost, and how busy the machine was meanwhile.
struct Load {
    /// CPU seconds of flowlog-inventory and flowlog-enricher.
    cpu: (f64, f64),
    /// Share of all CPUs busy during the churn (everything on the machine).
    machine_busy: f64,
    churn_time: Duration,
}

/// The result as Markdown.
#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    truth: &Truth,
    tally: &Tally,
    enriched: &Enriched,
    missing: u64,
    lag: &Lag,
    load: Load,
    hold_expired: Option<f64>,
) -> String {
    let Load {
        cpu,
        machine_busy,
        churn_time,
    } = load;
    let mut out = String::new();
    let flows = truth.flows.len() as u64;
    let owned = tally.owned_flows();
    let _ = writeln!(
        out,
        "## Attribution under pod address churn: {} addresses, {:?}\n",
        args.addresses, args.duration
    );
    let _ = writeln!(
        out,
        "flowlog {}; list/watch server → flowlog-inventory → ownership topic → flowlog-enricher \
         (hold {}), real processes and a real broker ({}). Each address changes hands every \
         {:?}–{:?} with {:?}–{:?} free between pods: {} reassignments, {} flows ({:.0} flows/s, \
         {:.0} pod events/s). \"Just after/before\" flows start {:?}–{:?} from the open/close; \
         \"near\" flows within {:?} either side of it. Lag: {}. Extra flowlog-inventory \
         arguments: {}. Seed {}.\n",
        args.revision,
        args.hold,
        args.brokers,
        args.tenure_min,
        args.tenure_max,
        args.gap_min,
        args.gap_max,
        truth.reassignments,
        flows,
        flows as f64 / churn_time.as_secs_f64(),
        (2 * truth.reassignments + u64::from(args.addresses)) as f64 / churn_time.as_secs_f64(),
        args.offset_min,
        args.offset_max,
        args.near,
        describe_lag(args),
        match args.inventory_arg.is_empty() {
            true => "none".to_owned(),
            false => format!("`{}`", args.inventory_arg.join(" ")),
        },
        args.seed,
    );
    let flowlog = tally.total(FLOWLOG);
    let latest = tally.total(LATEST);
    let _ = writeln!(
        out,
        "| lookup | flows | correct | misattributed | ambiguous | unknown (of {owned} flows whose address had an owner) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (name, s) in [
        ("flowlog (owner at the flow's start)", flowlog),
        ("latest owner (true current owner at export)", latest),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | **{}** | {} | {} |",
            s.flows,
            share(s.correct, s.flows),
            share(s.misattributed, s.flows),
            share(s.ambiguous, s.flows),
            share(s.unknown, owned),
        );
    }
    let unknown_share = flowlog.unknown as f64 / owned.max(1) as f64;
    let ambiguous_share = flowlog.ambiguous as f64 / flowlog.flows.max(1) as f64;
    let met = |ok: bool| if ok { "met" } else { "**MISSED**" };
    let _ = writeln!(
        out,
        "\nTargets: 0 misattributed — {}; unknown ≤ {:.1}% — {} ({:.4}%); ambiguous ≤ {:.1}% — {} \
         ({:.4}%).\n",
        // Target from the issue: no flow attributed to the wrong owner.
        met(flowlog.misattributed == 0),
        MAX_UNKNOWN_SHARE * 100.0,
        met(unknown_share <= MAX_UNKNOWN_SHARE),
        unknown_share * 100.0,
        MAX_AMBIGUOUS_SHARE * 100.0,
        met(ambiguous_share <= MAX_AMBIGUOUS_SHARE),
        ambiguous_share * 100.0,
    );
    // The flows within `--near` of a change are there to probe the hard part: within a probe
    // interval of a change nothing can be known, so their share is shown apart.
    let (mut placed, mut placed_ambiguous) = (0, 0);
    for (placement, [f, _]) in &tally.by_placement {
        if !matches!(placement, Placement::NearOpen | Placement::NearClose) {
            placed += f.flows;
            placed_ambiguous += f.ambiguous;
        }
    }
    let _ = writeln!(
        out,
        "Ambiguous among the flows not within `--near` of a change: {placed_ambiguous} of {placed} \
         ({:.4}%).\n",
        placed_ambiguous as f64 * 100.0 / placed.max(1) as f64
    );
    // A connect to an address a pod held completes its handshake (the record says so), which
    // rules nobody out; one into a gap goes unanswered and proves nothing.
    let unowned = flowlog.flows - owned;
    let _ = writeln!(
        out,
        "Ambiguous among the connects a pod answered (the address had an owner): {} of {owned} \
         ({:.4}%); among the connects into a gap, which nobody answered: {} of {unowned} \
         ({:.4}%).\n",
        flowlog.ambiguous_owned,
        flowlog.ambiguous_owned as f64 * 100.0 / owned.max(1) as f64,
        flowlog.ambiguous - flowlog.ambiguous_owned,
        (flowlog.ambiguous - flowlog.ambiguous_owned) as f64 * 100.0 / unowned.max(1) as f64,
    );
    let _ = writeln!(
        out,
        "| where the flow starts | flows | flowlog: correct / misattributed / ambiguous / unknown | latest owner: correct / misattributed / unknown |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for placement in Placement::ALL {
        let Some([f, l]) = tally.by_placement.get(&placement) else {
            continue;
        };
        let cells = |s: &Score| {
            format!(
                "{} / {} / {} / {}",
                s.correct, s.misattributed, s.ambiguous, s.unknown
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} / {} / {} |",
            placement.describe(),
            f.flows,
            cells(f),
            l.correct,
            l.misattributed,
            l.unknown
        );
    }
    let stamp = |v: &[i64]| {
        format!(
            "{} / {} / {} ms ({} tenures)",
            quantile(v, 0.5),
            quantile(v, 0.99),
            v.last().copied().unwrap_or(0),
            v.len()
        )
    };
    let _ = writeln!(
        out,
        "\nHow the inventory dates an ownership change against the API server's write (date − \
         write, p50 / p99 / max; an Open is dated at the end of its span, a Close at its start): \
         opens {}; closes {}. Widths of the uncertain spans sent with them (p50 / p99 / max): \
         {} / {} / {} ms ({} spans).\n",
        stamp(&lag.opens),
        stamp(&lag.closes),
        quantile(&lag.spans, 0.5),
        quantile(&lag.spans, 0.99),
        lag.spans.last().copied().unwrap_or(0),
        lag.spans.len()
    );
    let _ = writeln!(
        out,
        "CPU over the run ({:.0} s; the whole machine {:.0}% busy, this run and anything else): flowlog-inventory {:.1} s ({:.1}% of a core), \
         flowlog-enricher {:.1} s ({:.1}% of a core). Enricher output: {} duplicate messages \
         ({} disagreeing), {} undecodable, {} flows missing; flows released unattributed after the \
         hold: {}. Churn actions more than 50 ms late: {}.\n",
        churn_time.as_secs_f64(),
        machine_busy * 100.0,
        cpu.0,
        cpu.0 * 100.0 / churn_time.as_secs_f64(),
        cpu.1,
        cpu.1 * 100.0 / churn_time.as_secs_f64(),
        enriched.duplicates,
        enriched.conflicting,
        enriched.undecodable,
        missing,
        hold_expired.map_or("?".into(), |v| v.to_string()),
        truth.late_actions,
    );
    out
}
