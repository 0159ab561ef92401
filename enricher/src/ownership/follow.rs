//! An enricher's view of the topic: replayed, then followed, as an inventory source.
use std::{collections::BTreeMap, time::Duration};

use flowlog_diag::LogThrottle;
use flowlog_identity::{
    BoxFuture, InventorySource, OwnershipChange, SourceError, SourceRegistry, Timing,
};
use flowlog_kafka::{ClientErrors, ClientSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

use super::{OWNERSHIP_SOURCE, Polled, poll, reader, record::OwnershipRecord};

/// An enricher's view of the topic, as an inventory source named [`OWNERSHIP_SOURCE`]: replays
/// it from the beginning, then follows it. Each upstream source (the ones `flowlog-inventory`
/// runs) is relayed under the name `ownership/<source>`: its changes, its watermarks, and its
/// timing, registered in the index ([`SourceRegistry`]) when its first watermark is read, so
/// that each flow waits only for the upstream sources that could still change it (a flow to a
/// static range does not wait for EC2's next poll). The follower's own watermark gates every
/// flow until the replay has reached the end of the topic (until then, the index is not
/// complete for any time), then stands at the end of time: from there the upstream sources'
/// watermarks gate.
pub struct OwnershipTopicSource {
    client: ClientSettings,
    topic: String,
    registry: Option<SourceRegistry>,
}

impl OwnershipTopicSource {
    /// `client`: the brokers, or [`ClientSettings`] with the `--kafka-config` options.
    pub fn new(client: impl Into<ClientSettings>, topic: impl Into<String>) -> Self {
        Self {
            client: client.into(),
            topic: topic.into(),
            registry: None,
        }
    }
}

/// The name an upstream source of the topic has in an enricher's index.
pub fn relayed_name(upstream: &str) -> String {
    format!("{OWNERSHIP_SOURCE}/{upstream}")
}

/// A change read from the topic, with its source renamed as relayed.
pub(super) fn relayed(mut change: OwnershipChange) -> OwnershipChange {
    let source = change.source_mut();
    *source = relayed_name(source);
    change
}

impl InventorySource for OwnershipTopicSource {
    fn name(&self) -> &str {
        OWNERSHIP_SOURCE
    }

    fn relay_into(&mut self, registry: SourceRegistry) {
        self.registry = Some(registry);
    }

    fn run(
        self: Box<Self>,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let Self {
                client,
                topic,
                registry,
            } = *self;
            let (tx, mut rx) = mpsc::channel::<Polled>(4096);
            // librdkafka's poll blocks: a thread of its own feeds the async side.
            let stop = shutdown.clone();
            let reading = tokio::task::spawn_blocking(move || follow(&client, &topic, &stop, &tx));
            // Each upstream source's timing as registered.
            let mut upstream: BTreeMap<String, Timing> = BTreeMap::new();
            let mut caught_up = false;
            let mut opened = false;
            loop {
                let polled = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = rx.recv() => p,
                };
                let Some(polled) = polled else { break };
                match polled {
                    Polled::Record(Some(record)) => {
                        if let OwnershipRecord::Watermark { source, .. } = &record {
                            let timing = record.timing();
                            if upstream.get(source) != Some(&timing) {
                                // Registered before its watermark is applied: until then it
                                // holds flows back (it has reported nothing), never lets one
                                // through early.
                                if let Some(registry) = &registry {
                                    registry.register(&relayed_name(source), timing);
                                }
                                upstream.insert(source.clone(), timing);
                            }
                        }
                        for change in record.changes() {
                            if changes.send(relayed(change)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    Polled::Record(None) | Polled::Nothing => {}
                    Polled::End => caught_up = true,
                }
                // Once the replay is complete and some upstream source has reported, the
                // upstream sources' own watermarks gate the flows.
                if caught_up && !opened && !upstream.is_empty() {
                    opened = true;
                    let change = OwnershipChange::Watermark {
                        source: OWNERSHIP_SOURCE.to_string(),
                        at_ns: u64::MAX,
                    };
                    if changes.send(change).await.is_err() {
                        return Ok(());
                    }
                }
            }
            let _ = reading.await;
            Ok(())
        })
    }
}

/// Longest wait between two attempts to open the ownership topic.
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// The follower's reading thread: opens the topic (again and again, backing off, while the
/// brokers cannot be reached or refuse: the index holds flows meanwhile, and `/readyz` and
/// [`crate::metrics::OWNERSHIP_KAFKA_ERRORS`] say why), then reads it until `stop`, through broker outages and
/// restarts, handing what it reads to `tx`. Never gives up: a follower that stopped would leave
/// every later flow `unknown` until the process restarted.
fn follow(
    client: &ClientSettings,
    topic: &str,
    stop: &CancellationToken,
    tx: &mpsc::Sender<Polled>,
) {
    let opening = ClientErrors::new(
        m::OWNERSHIP_KAFKA_ERRORS,
        client.brokers.clone(),
        "retrying",
    );
    let mut delay = Duration::from_secs(1);
    let consumer = loop {
        if stop.is_cancelled() {
            return;
        }
        match reader(client, topic) {
            Ok(consumer) => break consumer,
            Err(e) => {
                let what = format!("opening {topic}: {}", flowlog_diag::error_chain(&e));
                opening.note("open_failed", &what);
                let until = std::time::Instant::now() + delay;
                while std::time::Instant::now() < until && !stop.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                delay = (delay * 2).min(REOPEN_MAX);
            }
        }
    };
    let mut malformed = LogThrottle::default();
    while !stop.is_cancelled() {
        let polled = poll(&consumer, topic, Duration::from_millis(100), &mut malformed);
        if !matches!(polled, Polled::Nothing) && tx.blocking_send(polled).is_err() {
            return;
        }
    }
}
