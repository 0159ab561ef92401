//! The EC2 inventory's flags (`--ec2`, cargo feature `ec2`) and the source they make.
use std::time::Duration;

use flowlog_ec2::{ClientOptions, Ec2Settings, Ec2Source, build_client};
use flowlog_identity::InventorySource;

/// Whether and how to read EC2. Ids and value names are spelled out: those of the flags before
/// they moved here (the derived ones would be the field names).
#[derive(Debug, Clone, clap::Args)]
pub struct Ec2Flags {
    /// Read EC2 network interfaces and instances (credentials from the SDK's default chain).
    #[arg(id = "ec2", long = "ec2", env = "FLOWLOG_EC2")]
    pub enabled: bool,
    /// EC2 region (default: the SDK's chain, e.g. AWS_REGION).
    #[arg(
        id = "ec2_region",
        value_name = "EC2_REGION",
        long = "ec2-region",
        env = "FLOWLOG_EC2_REGION"
    )]
    pub region: Option<String>,
    /// An EC2-compatible endpoint instead of the region's (e.g. moto in tests).
    #[arg(
        id = "ec2_endpoint",
        value_name = "EC2_ENDPOINT",
        long = "ec2-endpoint",
        env = "FLOWLOG_EC2_ENDPOINT"
    )]
    pub endpoint: Option<String>,
    /// Time between EC2 polls: changes are seen up to this late (each poll is the source's
    /// watermark, so flows newer than the last poll wait up to `--hold`).
    #[arg(id = "ec2_interval", value_name = "EC2_INTERVAL", long = "ec2-interval", env = "FLOWLOG_EC2_INTERVAL", default_value = "30s", value_parser = flowlog_cli::parse_duration)]
    pub interval: Duration,
    /// Only these VPCs (repeatable); default: the whole region.
    #[arg(
        id = "ec2_vpcs",
        value_name = "EC2_VPCS",
        long = "ec2-vpc",
        env = "FLOWLOG_EC2_VPCS",
        value_delimiter = ','
    )]
    pub vpcs: Vec<String>,
    /// Tags copied into identities' labels (repeatable); default: Name, app, team,
    /// aws:autoscaling:groupName.
    #[arg(
        id = "ec2_tags",
        value_name = "EC2_TAGS",
        long = "ec2-tag",
        env = "FLOWLOG_EC2_TAGS",
        value_delimiter = ','
    )]
    pub tags: Vec<String>,
}

impl Ec2Flags {
    /// The EC2 source, if `--ec2` asks for it.
    pub async fn source(&self) -> Option<Box<dyn InventorySource>> {
        if !self.enabled {
            return None;
        }
        let client = build_client(&ClientOptions {
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            ..ClientOptions::default()
        })
        .await;
        let mut settings = Ec2Settings {
            interval: self.interval,
            region: self.region.clone(),
            vpc_ids: self.vpcs.clone(),
            ..Ec2Settings::default()
        };
        if !self.tags.is_empty() {
            settings.tag_labels = self.tags.clone();
        }
        Some(Box::new(Ec2Source::new(client, settings)))
    }
}
