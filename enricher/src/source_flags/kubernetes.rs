//! The Kubernetes inventory's flags (`--kubernetes`, cargo feature `kubernetes`), the client they
//! describe and the source they make.
use std::time::Duration;

use anyhow::Context as _;
use flowlog_identity::InventorySource;
use flowlog_kubernetes::{KubernetesSettings, KubernetesSource};

/// Whether and how to watch Kubernetes. Ids and value names are spelled out: those of the flags
/// before they moved here (the derived ones would be the field names).
#[derive(Debug, Clone, clap::Args)]
pub struct KubernetesFlags {
    /// Watch Kubernetes pods, services, nodes and endpoint slices (in-cluster service account,
    /// else the kubeconfig).
    #[arg(id = "kubernetes", long = "kubernetes", env = "FLOWLOG_KUBERNETES")]
    pub enabled: bool,
    /// Watch the Kubernetes API at this URL without credentials (`kubectl proxy`, tests)
    /// instead of the default configuration; implies `--kubernetes`.
    #[arg(
        id = "kubernetes_url",
        value_name = "KUBERNETES_URL",
        long = "kubernetes-url",
        env = "FLOWLOG_KUBERNETES_URL"
    )]
    pub url: Option<String>,
    /// Kubernetes labels copied into identities (repeatable); default: app,
    /// app.kubernetes.io/name, app.kubernetes.io/component, team.
    #[arg(
        id = "kubernetes_labels",
        value_name = "KUBERNETES_LABELS",
        long = "kubernetes-label",
        env = "FLOWLOG_KUBERNETES_LABELS",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// How often each watched kind is probed (a consistent list of one object, for its
    /// resourceVersion; one request per kind). Changes are dated to within this, so connects
    /// nobody answered that start this close to one come out `ambiguous` (one a pod answered is
    /// exact); the watermark moves in these steps. 100 ms: at the attribution benchmark's
    /// churn (every address changing hands every 2–6 s, the watch up to 1 s late), before
    /// answered connects were told apart, 1 s left 62% of flows 10–500 ms from a change
    /// ambiguous and 100 ms 4.3% (benches/RESULTS.md), for 10 one-object lists per kind per
    /// second from the one publishing replica.
    #[arg(id = "kubernetes_probe_interval", value_name = "KUBERNETES_PROBE_INTERVAL", long = "kubernetes-probe-interval", env = "FLOWLOG_KUBERNETES_PROBE_INTERVAL", default_value = "100ms", value_parser = flowlog_cli::parse_duration)]
    pub probe_interval: Duration,
    /// How long each watch request lasts before it is resumed (at least 3 s: kube-apiserver
    /// sends the bookmark that proves a quiet kind complete 2 s before this ends).
    #[arg(id = "kubernetes_watch_timeout", value_name = "KUBERNETES_WATCH_TIMEOUT", long = "kubernetes-watch-timeout", env = "FLOWLOG_KUBERNETES_WATCH_TIMEOUT", default_value = "3s", value_parser = flowlog_cli::parse_duration)]
    pub watch_timeout: Duration,
}

impl KubernetesFlags {
    /// Whether the flags ask for the Kubernetes source.
    pub fn wanted(&self) -> bool {
        self.enabled || self.url.is_some()
    }

    /// The Kubernetes client the flags describe: `--kubernetes-url` without credentials, else the
    /// in-cluster service account or the kubeconfig. The Kubernetes source and leader election
    /// (`flowlog-inventory --leader-election`) use the same one.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        match &self.url {
            Some(url) => {
                let uri = url
                    .parse()
                    .with_context(|| format!("--kubernetes-url {url}"))?;
                kube::Client::try_from(kube::Config::new(uri))
                    .with_context(|| format!("a Kubernetes client for {url}"))
            }
            None => kube::Client::try_default()
                .await
                .context("the Kubernetes client (in-cluster or kubeconfig)"),
        }
    }

    /// The Kubernetes source, if the flags ask for it, watching through `client` (one the
    /// caller shares, e.g. with leader election), else through [`KubernetesFlags::client`].
    pub async fn source(
        &self,
        client: Option<kube::Client>,
    ) -> anyhow::Result<Option<Box<dyn InventorySource>>> {
        if !self.wanted() {
            return Ok(None);
        }
        let client = match client {
            Some(client) => client,
            None => self.client().await?,
        };
        let mut settings = KubernetesSettings {
            probe_interval: self.probe_interval,
            watch_timeout: self.watch_timeout.max(Duration::from_secs(3)),
            ..KubernetesSettings::default()
        };
        if !self.labels.is_empty() {
            settings.labels = self.labels.clone();
        }
        Ok(Some(Box::new(KubernetesSource::new(client, settings))))
    }
}
