//! The inventory-source flags that `flowlog-enricher` (reading sources directly) and
//! `flowlog-inventory` (publishing them to `flows.ownership`) share, and the sources they make.
//! Binary-facing: errors are `anyhow` with the flag's context.
//!
//! Every source registered gates the enricher's index: flows newer than a source's last
//! complete view wait up to `--hold` (EC2 polls every `--ec2-interval`: see README).
//!
//! The EC2 flags ([`ec2`]) and the Kubernetes flags ([`kubernetes`]) exist only in builds with
//! the cargo feature of the same name: a build without one has neither its flags nor its crates.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use flowlog_identity::{HostSource, InventorySource, StaticSource};

#[cfg(feature = "ec2")]
pub mod ec2;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;

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
    #[cfg(feature = "ec2")]
    #[command(flatten)]
    pub ec2: ec2::Ec2Flags,
    #[cfg(feature = "kubernetes")]
    #[command(flatten)]
    pub kubernetes: kubernetes::KubernetesFlags,
}

impl SourceFlags {
    /// The sources the flags ask for, opened (a static file that does not load is an error
    /// naming it).
    pub async fn sources(&self) -> anyhow::Result<Vec<Box<dyn InventorySource>>> {
        let mut sources = Vec::new();
        sources.extend(self.sources_but_kubernetes().await?);
        #[cfg(feature = "kubernetes")]
        sources.extend(self.kubernetes.source(None).await?);
        Ok(sources)
    }

    /// Every source the flags ask for except the Kubernetes one, opened: for a caller that
    /// makes the Kubernetes source with a client of its own ([`kubernetes::KubernetesFlags::source`]).
    pub async fn sources_but_kubernetes(&self) -> anyhow::Result<Vec<Box<dyn InventorySource>>> {
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
        #[cfg(feature = "ec2")]
        sources.extend(self.ec2.source().await);
        Ok(sources)
    }

    /// The longest time between two watermarks of the sources the flags ask for: a source
    /// reports at least this often.
    pub fn watermark_period(&self) -> Duration {
        let mut longest = Duration::from_secs(1); // the host and Kubernetes sources
        if !self.static_files.is_empty() {
            longest = longest.max(self.static_interval);
        }
        #[cfg(feature = "ec2")]
        if self.ec2.enabled {
            longest = longest.max(self.ec2.interval);
        }
        longest
    }
}
