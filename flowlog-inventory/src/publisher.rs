//! The leader's work: replay the ownership topic, run the sources and publish their changes
//! (`flowlog_enricher::ownership`), and say when that is ready (every source's first complete
//! view published, a publish acknowledged recently).
use std::{collections::BTreeSet, time::Duration};

use anyhow::Context as _;
use flowlog_cli::Health;
use flowlog_enricher::{ownership, source_flags::SourceFlags};
use flowlog_identity::{InventorySource, spawn_source};
use flowlog_kafka::ClientSettings;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A leader is not ready when no publish was acknowledged for this long, at least (see
/// [`publish_window`]).
const MIN_PUBLISH_WINDOW: Duration = Duration::from_secs(60);

/// How long a leader may go without an acknowledged publish and still be ready: three of its
/// sources' longest watermark periods (each source sends a watermark at least that often, and
/// each is published), and at least a minute.
pub(crate) fn publish_window(flags: &SourceFlags) -> Duration {
    (flags.watermark_period() * 3).max(MIN_PUBLISH_WINDOW)
}

/// What the leader publishes with.
pub(crate) struct Publisher {
    pub(crate) client: ClientSettings,
    pub(crate) topic: String,
    pub(crate) retention: Duration,
    pub(crate) window: Duration,
    pub(crate) health: Health,
    pub(crate) shutdown: CancellationToken,
}

impl Publisher {
    /// Replays the topic, runs the sources and publishes until they stop (after shutdown).
    pub(crate) async fn run(self, sources: Vec<Box<dyn InventorySource>>) -> anyhow::Result<()> {
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
