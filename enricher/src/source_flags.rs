//! The inventory-source flags that `flowlog-enricher` (reading sources directly) and
//! `flowlog-inventory` (publishing them to `flows.ownership`) share, and the sources they make.
//! Binary-facing: errors are `anyhow` with the flag's context.
//!
//! Every source registered gates the enricher's index: flows newer than a source's last
//! complete view wait up to `--hold` (EC2 polls every `--ec2-interval`: see README).
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use flowlog_ec2::{ClientOptions, Ec2Settings, Ec2Source, build_client};
use flowlog_identity::{HostSource, InventorySource, StaticSource};
use flowlog_kubernetes::{KubernetesSettings, KubernetesSource};

/// Which inventories to read, and how.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceFlags {
    /// A static inventory file (TOML: CIDR → identity, optional validity times); repeatable.
    #[arg(long = "static", env = "FLOWLOG_STATIC", value_delimiter = ',')]
    pub static_files: Vec<PathBuf>,
    /// How often static files are checked for changes. Each check is also the source's
    /// watermark: keep it well under `--hold`, or flows wait for it.
    #[arg(long, env = "FLOWLOG_STATIC_INTERVAL", default_value = "1s", value_parser = flowlog_cli::parse_duration)]
    pub static_interval: Duration,
    /// Attribute this host's own addresses (one-host use).
    #[arg(long, env = "FLOWLOG_HOST_SOURCE")]
    pub host_source: bool,
    /// Read EC2 network interfaces and instances (credentials from the SDK's default chain).
    #[arg(long, env = "FLOWLOG_EC2")]
    pub ec2: bool,
    /// EC2 region (default: the SDK's chain, e.g. AWS_REGION).
    #[arg(long, env = "FLOWLOG_EC2_REGION")]
    pub ec2_region: Option<String>,
    /// An EC2-compatible endpoint instead of the region's (e.g. moto in tests).
    #[arg(long, env = "FLOWLOG_EC2_ENDPOINT")]
    pub ec2_endpoint: Option<String>,
    /// Time between EC2 polls: changes are seen up to this late (each poll is the source's
    /// watermark, so flows newer than the last poll wait up to `--hold`).
    #[arg(long, env = "FLOWLOG_EC2_INTERVAL", default_value = "30s", value_parser = flowlog_cli::parse_duration)]
    pub ec2_interval: Duration,
    /// Only these VPCs (repeatable); default: the whole region.
    #[arg(long = "ec2-vpc", env = "FLOWLOG_EC2_VPCS", value_delimiter = ',')]
    pub ec2_vpcs: Vec<String>,
    /// Tags copied into identities' labels (repeatable); default: Name, app, team,
    /// aws:autoscaling:groupName.
    #[arg(long = "ec2-tag", env = "FLOWLOG_EC2_TAGS", value_delimiter = ',')]
    pub ec2_tags: Vec<String>,
    /// Watch Kubernetes pods, services, nodes and endpoint slices (in-cluster service account,
    /// else the kubeconfig).
    #[arg(long, env = "FLOWLOG_KUBERNETES")]
    pub kubernetes: bool,
    /// Watch the Kubernetes API at this URL without credentials (`kubectl proxy`, tests)
    /// instead of the default configuration; implies `--kubernetes`.
    #[arg(long, env = "FLOWLOG_KUBERNETES_URL")]
    pub kubernetes_url: Option<String>,
    /// Kubernetes labels copied into identities (repeatable); default: app,
    /// app.kubernetes.io/name, app.kubernetes.io/component, team.
    #[arg(
        long = "kubernetes-label",
        env = "FLOWLOG_KUBERNETES_LABELS",
        value_delimiter = ','
    )]
    pub kubernetes_labels: Vec<String>,
    /// How often each watched kind is probed (a consistent list of one object, for its
    /// resourceVersion; one request per kind). Changes are dated to within this, so connects
    /// nobody answered that start this close to one come out `ambiguous` (one a pod answered is
    /// exact); the watermark moves in these steps. 100 ms: at the attribution benchmark's
    /// churn (every address changing hands every 2–6 s, the watch up to 1 s late), before
    /// answered connects were told apart, 1 s left 62% of flows 10–500 ms from a change
    /// ambiguous and 100 ms 4.3% (benches/RESULTS.md), for 10 one-object lists per kind per
    /// second from the one publishing replica.
    #[arg(long, env = "FLOWLOG_KUBERNETES_PROBE_INTERVAL", default_value = "100ms", value_parser = flowlog_cli::parse_duration)]
    pub kubernetes_probe_interval: Duration,
    /// How long each watch request lasts before it is resumed (at least 3 s: kube-apiserver
    /// sends the bookmark that proves a quiet kind complete 2 s before this ends).
    #[arg(long, env = "FLOWLOG_KUBERNETES_WATCH_TIMEOUT", default_value = "3s", value_parser = flowlog_cli::parse_duration)]
    pub kubernetes_watch_timeout: Duration,
}

impl SourceFlags {
    /// Whether the flags ask for the Kubernetes source.
    pub fn kubernetes_wanted(&self) -> bool {
        self.kubernetes || self.kubernetes_url.is_some()
    }

    /// The Kubernetes client the flags describe: `--kubernetes-url` without credentials, else the
    /// in-cluster service account or the kubeconfig. The Kubernetes source and leader election
    /// (`flowlog-inventory --leader-election`) use the same one.
    pub async fn kubernetes_client(&self) -> anyhow::Result<kube::Client> {
        match &self.kubernetes_url {
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

    /// The sources the flags ask for, opened (a static file that does not load is an error
    /// naming it).
    pub async fn sources(&self) -> anyhow::Result<Vec<Box<dyn InventorySource>>> {
        let client = match self.kubernetes_wanted() {
            true => Some(self.kubernetes_client().await?),
            false => None,
        };
        self.sources_with(client).await
    }

    /// [`SourceFlags::sources`] with the Kubernetes client `kubernetes` (it must be `Some` if the
    /// flags ask for the Kubernetes source).
    pub async fn sources_with(
        &self,
        kubernetes: Option<kube::Client>,
    ) -> anyhow::Result<Vec<Box<dyn InventorySource>>> {
        let mut sources: Vec<Box<dyn InventorySource>> = Vec::new();
        for path in &self.static_files {
            let source = StaticSource::open(path, self.static_interval)
                .with_context(|| format!("loading the static inventory {}", path.display()))?;
            sources.push(Box::new(source));
        }
        if self.host_source {
            let host =
                HostSource::new(Duration::from_secs(1)).context("starting the host source")?;
            sources.push(Box::new(host));
        }
        if self.ec2 {
            let client = build_client(&ClientOptions {
                region: self.ec2_region.clone(),
                endpoint: self.ec2_endpoint.clone(),
                ..ClientOptions::default()
            })
            .await;
            let mut settings = Ec2Settings {
                interval: self.ec2_interval,
                region: self.ec2_region.clone(),
                vpc_ids: self.ec2_vpcs.clone(),
                ..Ec2Settings::default()
            };
            if !self.ec2_tags.is_empty() {
                settings.tag_labels = self.ec2_tags.clone();
            }
            sources.push(Box::new(Ec2Source::new(client, settings)));
        }
        if self.kubernetes_wanted() {
            let mut settings = KubernetesSettings {
                probe_interval: self.kubernetes_probe_interval,
                watch_timeout: self.kubernetes_watch_timeout.max(Duration::from_secs(3)),
                ..KubernetesSettings::default()
            };
            if !self.kubernetes_labels.is_empty() {
                settings.labels = self.kubernetes_labels.clone();
            }
            let client = kubernetes.context("the Kubernetes source needs a Kubernetes client")?;
            sources.push(Box::new(KubernetesSource::new(client, settings)));
        }
        Ok(sources)
    }
}
