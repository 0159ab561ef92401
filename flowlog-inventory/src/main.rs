//! `flowlog-inventory`: watches the inventories once (static files, this host, Kubernetes, EC2)
//! and publishes their ownership tenures to the compacted `flows.ownership` topic, which every
//! `flowlog-enricher --ownership-topic` replica follows — so API servers are not watched once per
//! replica. Run one, or several with `--leader-election`: they elect a leader on a
//! `coordination.k8s.io/v1` Lease (`flowlog_kubernetes::election`), and only the leader runs the
//! sources and publishes.
//!
//! A standby neither watches nor reads the topic: it only reads the Lease every retry period.
//! When it becomes the leader it replays the topic then (the previous leader has stopped by
//! then, so the replay sees everything it published) and starts the sources. A warm follower of
//! the topic would save only that replay of a compacted topic — seconds — and would still have to
//! read to the end after taking over.
//!
//! A leader that cannot renew the Lease before its renew deadline ends the process at once
//! (exit 1) from a thread of its own, whatever the async runtime is doing: nothing it queued can
//! reach the topic after another replica may have taken over, and Kubernetes restarts it as a
//! standby. On SIGTERM the leader stops its sources, waits for what it sent to be acknowledged,
//! then releases the Lease so that a standby takes over at its next look (within a retry period).
//!
//! `/healthz` answers whether the main loop beats; `/readyz` whether this replica does its job:
//! a leader once every source's first complete view (its first watermark) has been published and
//! a publish was acknowledged recently, a standby while it reads the Lease successfully.
use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use flowlog_cli::Health;
use flowlog_enricher::{metrics as m, ownership, source_flags::SourceFlags};
use flowlog_identity::{InventorySource, spawn_source};
use flowlog_kafka::ClientSettings;
use flowlog_kubernetes::election::{ElectionConfig, Elector, Lost, Term, spawn_fence};
use metrics::{counter, gauge};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// `/healthz` fails when the main loop has not beaten for this long (it beats every second).
const STALL_AFTER: Duration = Duration::from_secs(30);
/// A leader is not ready when no publish was acknowledged for this long, at least (see
/// [`publish_window`]).
const MIN_PUBLISH_WINDOW: Duration = Duration::from_secs(60);
/// Where Kubernetes mounts the pod's namespace.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Publishes who owned which address, when, to the flows.ownership topic.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: flowlog_cli::ConfigFile,
    /// Kafka bootstrap servers [default: `bootstrap.servers` of `--kafka-config`, else
    /// 127.0.0.1:9092].
    #[arg(long, env = "FLOWLOG_KAFKA_BROKERS")]
    brokers: Option<String>,
    /// A client.properties file of librdkafka options (`key=value` lines, `#` comments) for
    /// every Kafka client of the inventory (its publisher and the replay at start): TLS, SASL, ...
    #[arg(long, env = "FLOWLOG_KAFKA_CONFIG")]
    kafka_config: Option<PathBuf>,
    /// The ownership topic (one partition, `cleanup.policy=compact`); it must exist.
    #[arg(
        long,
        env = "FLOWLOG_OWNERSHIP_TOPIC",
        default_value = "flows.ownership"
    )]
    ownership_topic: String,
    #[command(flatten)]
    sources: SourceFlags,
    /// Closed tenures older than this are deleted from the topic (tombstones).
    #[arg(long, env = "FLOWLOG_RETENTION", default_value = "6h", value_parser = flowlog_cli::parse_duration_or_zero)]
    retention: Duration,
    /// Listener for /metrics, /healthz and /readyz.
    #[arg(long, env = "FLOWLOG_METRICS_ADDR", default_value = "127.0.0.1:9466")]
    metrics_addr: SocketAddr,
    #[command(flatten)]
    election: ElectionFlags,
}

/// Leader election among replicas: only the holder of the Lease publishes.
#[derive(Debug, Clone, clap::Args)]
struct ElectionFlags {
    /// Publish only while holding the Lease `--lease-name` (coordination.k8s.io/v1), standing by
    /// otherwise; uses the Kubernetes client of `--kubernetes-url`, else the in-cluster service
    /// account or the kubeconfig.
    #[arg(long, env = "FLOWLOG_LEADER_ELECTION")]
    leader_election: bool,
    /// The Lease's name.
    #[arg(long, env = "FLOWLOG_LEASE_NAME", default_value = "flowlog-inventory")]
    lease_name: String,
    /// The Lease's namespace (default: the pod's, from its service account, else `default`).
    #[arg(long, env = "FLOWLOG_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity, unique among the replicas (default: the host name, which is the
    /// pod name).
    #[arg(long, env = "FLOWLOG_LEASE_IDENTITY")]
    lease_identity: Option<String>,
    /// How long standbys wait after they last saw the Lease renewed before taking it (whole
    /// seconds, at least 3). The leader renews every third of it and stops at two thirds.
    #[arg(long, env = "FLOWLOG_LEASE_DURATION", default_value = "15s", value_parser = flowlog_cli::parse_duration)]
    lease_duration: Duration,
}

impl ElectionFlags {
    fn config(&self) -> anyhow::Result<ElectionConfig> {
        let namespace = match &self.lease_namespace {
            Some(ns) => ns.clone(),
            None => std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                .map(|ns| ns.trim().to_string())
                .ok()
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| "default".to_string()),
        };
        let identity = match &self.lease_identity {
            Some(id) => id.clone(),
            None => hostname().context(
                "finding this replica's identity (the host name); give --lease-identity",
            )?,
        };
        ElectionConfig::new(namespace, &self.lease_name, identity, self.lease_duration)
            .context("--lease-duration")
    }
}

/// The host name (in a pod, the pod's name).
fn hostname() -> anyhow::Result<String> {
    let path = Path::new("/proc/sys/kernel/hostname");
    let name = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!name.is_empty(), "{} is empty", path.display());
    Ok(name)
}

/// How long a leader may go without an acknowledged publish and still be ready: three of its
/// sources' longest watermark periods (each source sends a watermark at least that often, and
/// each is published), and at least a minute.
fn publish_window(flags: &SourceFlags) -> Duration {
    (flags.watermark_period() * 3).max(MIN_PUBLISH_WINDOW)
}

/// Runs `work` while beating `health` every second: the main loop's liveness.
async fn beating<T>(health: &Health, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => health.beat(),
        }
    }
}

/// Ends the process at once, without running destructors or flushing anything: the only way
/// to be sure that nothing this leader queued reaches the topic after its term.
fn stop_now(why: &str) -> ! {
    error!("{why}: stopping at once (exit 1) so that no other replica's publishing overlaps");
    // SAFETY: _exit(2) only ends the process; no Rust state is observed afterwards.
    unsafe { libc::_exit(1) }
}

/// What the leader publishes with.
struct Publisher {
    client: ClientSettings,
    topic: String,
    retention: Duration,
    window: Duration,
    health: Health,
    shutdown: CancellationToken,
}

impl Publisher {
    /// Replays the topic, runs the sources and publishes until they stop (after shutdown).
    async fn run(self, sources: Vec<Box<dyn InventorySource>>) -> anyhow::Result<()> {
        let Self {
            client,
            topic,
            retention,
            window,
            health,
            shutdown,
        } = self;
        let mut pending: BTreeSet<String> = sources.iter().map(|s| s.name().to_string()).collect();
        let waiting = |pending: &BTreeSet<String>| {
            let names: Vec<&str> = pending.iter().map(String::as_str).collect();
            format!(
                "waiting for the first complete view of {}",
                names.join(", ")
            )
        };
        health.expect("sources", waiting(&pending));
        health.expect_fresh("publishing", window);
        let (c, t) = (client.clone(), topic.clone());
        let mut tenures = tokio::task::spawn_blocking(move || ownership::replay_tenures(&c, &t))
            .await?
            .with_context(|| format!("replaying {topic}"))?;
        for source in &sources {
            tenures.set_timing(source.name(), source.timing());
        }
        let (tx, rx) = mpsc::channel(65_536);
        let tasks: Vec<_> = sources
            .into_iter()
            .map(|s| spawn_source(s, tx.clone(), shutdown.clone()))
            .collect();
        drop(tx);
        info!(%topic, sources = tasks.len(), "publishing ownership");
        let acknowledged = |watermark: Option<&str>| {
            health.touch("publishing");
            if let Some(source) = watermark
                && pending.remove(source)
            {
                if pending.is_empty() {
                    info!("every source's first complete view is published");
                    health.set_ready("sources");
                } else {
                    health.set_not_ready("sources", waiting(&pending));
                }
            }
        };
        ownership::publish(&client, &topic, tenures, rx, retention, acknowledged)
            .await
            .with_context(|| format!("publishing to {topic}"))?;
        for task in tasks {
            let _ = task.await;
        }
        Ok(())
    }
}

async fn run(args: Args, kafka: ClientSettings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    flowlog_enricher::inventory::cancel_on_signal(shutdown.clone())?;
    let health = Health::new(STALL_AFTER);
    let addr = flowlog_enricher::metrics::serve(args.metrics_addr, health.clone()).await?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    let election = match args.election.leader_election {
        true => Some(args.election.config()?),
        false => None,
    };
    let client = match election.is_some() || args.sources.kubernetes.wanted() {
        true => Some(args.sources.kubernetes.client().await?),
        false => None,
    };
    let mut sources = args.sources.sources_but_kubernetes().await?;
    sources.extend(args.sources.kubernetes.source(client.clone()).await?);
    anyhow::ensure!(
        !sources.is_empty(),
        "no inventory source: give --static, --host-source, --ec2 or --kubernetes"
    );
    let publisher = Publisher {
        client: kafka,
        topic: args.ownership_topic.clone(),
        retention: args.retention,
        window: publish_window(&args.sources),
        health: health.clone(),
        shutdown: shutdown.clone(),
    };
    let (Some(config), Some(client)) = (election, client) else {
        gauge!(m::INVENTORY_LEADER).set(1.0);
        return beating(&health, publisher.run(sources)).await;
    };
    lead(config, client, publisher, sources, &health, &shutdown).await
}

/// The replica's life under leader election: stand by until it holds the Lease, then publish
/// until shutdown (and release the Lease) or until the Lease is lost (and end the process).
async fn lead(
    config: ElectionConfig,
    client: kube::Client,
    publisher: Publisher,
    sources: Vec<Box<dyn InventorySource>>,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let lease = format!("{}/{}", config.namespace, config.name);
    let identity = config.identity.clone();
    // A standby that cannot read the Lease for a lease duration is not ready.
    health.expect_fresh("lease", config.lease_duration);
    gauge!(m::INVENTORY_LEADER).set(0.0);
    let touched = health.clone();
    let mut elector = Elector::new(client, config).on_contact(move || touched.touch("lease"));
    info!(%lease, %identity, "leader election: standing by until this replica holds the Lease");
    let term: Term = tokio::select! {
        term = beating(health, elector.acquire()) => term,
        () = shutdown.cancelled() => {
            info!("stopped while standing by");
            return Ok(());
        }
    };
    spawn_fence(term.clone(), || {
        stop_now("leadership lost: the Lease was not renewed before the renew deadline");
    })
    .context("starting the lease fence thread")?;
    counter!(m::INVENTORY_LEADER_TRANSITIONS).increment(1);
    gauge!(m::INVENTORY_LEADER).set(1.0);
    info!(%lease, %identity, "leadership gained: this replica publishes");

    let stop_renewing = CancellationToken::new();
    let renewing = {
        let (term, stop) = (term.clone(), stop_renewing.clone());
        tokio::spawn(async move {
            let lost = tokio::select! {
                lost = elector.hold(&term) => Some(lost),
                () = stop.cancelled() => None,
            };
            (elector, lost)
        })
    };
    tokio::pin!(renewing);
    let published = tokio::select! {
        published = beating(health, publisher.run(sources)) => published,
        ended = &mut renewing => {
            let lost = match ended {
                Ok((_, Some(lost))) => lost,
                Ok((_, None)) | Err(_) => Lost::Deadline,
            };
            info!(%lease, %identity, "leadership lost: {lost}");
            stop_now(&format!("leadership lost ({lost})"))
        }
    };
    // Nothing is published any more: the Lease can go to a standby.
    stop_renewing.cancel();
    let (mut elector, lost) = renewing.await.context("the lease renewal task")?;
    if let Some(lost) = lost {
        stop_now(&format!("leadership lost ({lost})"));
    }
    match elector.release().await {
        Ok(true) => info!(%lease, %identity, "leadership released"),
        Ok(false) => info!(%lease, "the Lease was not ours to release any more"),
        Err(e) => error!(
            "releasing the Lease: {:#}; a standby takes over when it expires",
            anyhow::Error::from(e)
        ),
    }
    term.retire();
    gauge!(m::INVENTORY_LEADER).set(0.0);
    published
}

fn main() -> ExitCode {
    let args: Args = flowlog_cli::parse_with_config_file();
    let client = flowlog_cli::usage_checked::<Args, _, _>(
        "'--kafka-config' (FLOWLOG_KAFKA_CONFIG)",
        ClientSettings::load(args.brokers.as_deref(), args.kafka_config.as_deref()),
    );
    flowlog_cli::main(flowlog_cli::Runtime::Workers(2), run(args, client))
}
