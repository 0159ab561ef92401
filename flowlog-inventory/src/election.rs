//! Leader election among `flowlog-inventory` replicas on a `coordination.k8s.io/v1` Lease
//! (`flowlog_kubernetes::election`): a standby only reads the Lease; the leader publishes, ends
//! the process at once if its term ends before it renewed, and releases the Lease on shutdown.
use std::{path::Path, time::Duration};

use anyhow::Context as _;
use flowlog_cli::Health;
use flowlog_enricher::metrics as m;
use flowlog_identity::InventorySource;
use flowlog_kubernetes::election::{ElectionConfig, Elector, Lost, Term, spawn_fence};
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::{beating, publisher::Publisher};

/// Where Kubernetes mounts the pod's namespace.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Leader election among replicas: only the holder of the Lease publishes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ElectionFlags {
    /// Publish only while holding the Lease `--lease-name` (coordination.k8s.io/v1), standing by
    /// otherwise; uses the Kubernetes client of `--kubernetes-url`, else the in-cluster service
    /// account or the kubeconfig.
    #[arg(long, env = "FLOWLOG_LEADER_ELECTION")]
    pub(crate) leader_election: bool,
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
    pub(crate) fn config(&self) -> anyhow::Result<ElectionConfig> {
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

/// Ends the process at once, without running destructors or flushing anything: the only way
/// to be sure that nothing this leader queued reaches the topic after its term.
fn stop_now(why: &str) -> ! {
    error!("{why}: stopping at once (exit 1) so that no other replica's publishing overlaps");
    // SAFETY: _exit(2) only ends the process; no Rust state is observed afterwards.
    unsafe { libc::_exit(1) }
}

/// The replica's life under leader election: stand by until it holds the Lease, then publish
/// until shutdown (and release the Lease) or until the Lease is lost (and end the process).
pub(crate) async fn lead(
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
