//! The EC2 inventory source: polls DescribeNetworkInterfaces and DescribeInstances every
//! `interval`, diffs each complete view against the last one and sends the difference, then a
//! watermark. See the crate docs for the timing rules and their error bound.
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, NetworkInterface};
use flowlog_identity::{
    BoxFuture, FailureLog, InventorySource, OwnershipChange, SourceError, Timing, now_ns, send_all,
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    EC2_SOURCE,
    error::Ec2Error,
    snapshot::{self, BuildContext, Snapshot},
};

/// How the source polls and what it copies into identities.
#[derive(Debug, Clone)]
pub struct Ec2Settings {
    /// Time between the starts of two polls (`--ec2-interval`). Ownership changes are seen up to
    /// this late, and a handover inside one interval is attributed to the old owner until the
    /// poll that sees it: the main knob of accuracy against API cost.
    pub interval: Duration,
    /// Tags copied into identities' labels (an allow-list, so that labels stay few and known).
    pub tag_labels: Vec<String>,
    /// The region named in identities; `None`: the client's region.
    pub region: Option<String>,
    /// Only ENIs and instances in these VPCs (`vpc-id` filter); empty: all of the region.
    pub vpc_ids: Vec<String>,
    /// Page size of both calls (`MaxResults`, 5–1000 on AWS). Default 1000, the largest: fewest
    /// calls against the account's request budget. `None`: no paging asked (the API then answers
    /// in one page, which can time out on large accounts).
    pub max_results: Option<i32>,
    /// First wait after a failed poll; doubled per further failure (with jitter) up to
    /// `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for Ec2Settings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            tag_labels: ["Name", "app", "team", "aws:autoscaling:groupName"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            region: None,
            vpc_ids: Vec::new(),
            max_results: Some(1000),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// The EC2 source: the client, its settings, and the snapshot as last sent.
#[derive(Debug)]
pub struct Ec2Source {
    client: aws_sdk_ec2::Client,
    settings: Ec2Settings,
    region: Option<String>,
    /// What the index has been told (the last successful poll's snapshot)...
    applied: Snapshot,
    /// ...and that poll's time (its watermark), `None` before the first.
    applied_at: Option<u64>,
    failures: FailureLog,
}

impl Ec2Source {
    /// A source polling through `client` (see [`build_client`](crate::build_client); tests point
    /// one at moto). Nothing is called until the first poll: an unreachable API shows as failed
    /// polls, counted and retried, never as a start-up error, so the enricher runs (holding
    /// flows) through an EC2 outage.
    pub fn new(client: aws_sdk_ec2::Client, settings: Ec2Settings) -> Self {
        let region = settings
            .region
            .clone()
            .or_else(|| client.config().region().map(|r| r.as_ref().to_owned()));
        Self {
            client,
            settings,
            region,
            applied: Snapshot::new(),
            applied_at: None,
            failures: FailureLog::new(EC2_SOURCE),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &Ec2Settings {
        &self.settings
    }

    /// `(owner, prefix)` pairs currently open (as last sent).
    pub fn prefixes(&self) -> usize {
        self.applied.len()
    }

    /// Polls that failed since the last good one.
    pub fn failures(&self) -> u64 {
        self.failures.failures()
    }

    /// One poll, started at `at_ns`: reads every page of both calls, then returns the changes
    /// since the last successful poll, at `at_ns` (the new owner of a handed-over prefix from
    /// just after the last successful poll: see [`snapshot::diff`]), followed by
    /// `Watermark(at_ns)`. A failure
    /// anywhere is counted and logged (once while it lasts), changes nothing and returns the
    /// error: an incomplete view must close nothing. [`InventorySource::run`] calls it every
    /// interval; tests call it with chosen times.
    pub async fn poll(&mut self, at_ns: u64) -> Result<Vec<OwnershipChange>, Ec2Error> {
        let snapshot = match self.read().await {
            Ok(s) => s,
            Err(e) => {
                self.failures.failed_kind(e.kind.as_str(), &e);
                metrics::counter!(crate::metrics::POLLS, "result" => "error").increment(1);
                return Err(e);
            }
        };
        self.failures.succeeded();
        metrics::counter!(crate::metrics::POLLS, "result" => "ok").increment(1);
        let mut changes = snapshot::diff(&self.applied, &snapshot, self.applied_at, at_ns);
        changes.push(OwnershipChange::Watermark {
            source: EC2_SOURCE.to_owned(),
            at_ns,
        });
        self.applied = snapshot;
        self.applied_at = Some(at_ns);
        metrics::gauge!(crate::metrics::PREFIXES).set(self.applied.len() as f64);
        Ok(changes)
    }

    fn filters(&self) -> Option<Vec<Filter>> {
        (!self.settings.vpc_ids.is_empty()).then(|| {
            vec![
                Filter::builder()
                    .name("vpc-id")
                    .set_values(Some(self.settings.vpc_ids.clone()))
                    .build(),
            ]
        })
    }

    /// The complete view: interfaces first, then instances, so that an instance an ENI is
    /// attached to has almost always been launched by the time instances are listed.
    async fn read(&self) -> Result<Snapshot, Ec2Error> {
        let enis: Vec<NetworkInterface> = self
            .client
            .describe_network_interfaces()
            .set_filters(self.filters())
            .set_max_results(self.settings.max_results)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| Ec2Error::from_sdk("DescribeNetworkInterfaces", e))?;
        let reservations = self
            .client
            .describe_instances()
            .set_filters(self.filters())
            .set_max_results(self.settings.max_results)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| Ec2Error::from_sdk("DescribeInstances", e))?;
        let instances = snapshot::instance_infos(
            reservations.iter().flat_map(|r| r.instances()),
            &self.settings.tag_labels,
        );
        Ok(snapshot::build(
            &enis,
            &instances,
            &BuildContext {
                tag_labels: &self.settings.tag_labels,
                region: self.region.as_deref(),
            },
        ))
    }

    /// Wait before the next attempt after `failures` failed polls in a row: exponential from
    /// `backoff_initial`, capped at `backoff_max`, with "equal jitter" (a random half of it) so
    /// that many enrichers throttled together do not retry together.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        let full = self
            .settings
            .backoff_initial
            .saturating_mul(1 << exp)
            .min(self.settings.backoff_max);
        full / 2 + full.mul_f64(fastrand::f64() / 2.0)
    }
}

impl InventorySource for Ec2Source {
    fn name(&self) -> &str {
        EC2_SOURCE
    }

    /// Polled: a change is dated at the start of the poll that sees it, and polls start at
    /// least `interval` apart (see [`InventorySource::run`] below), so until its next poll the
    /// source can change only the prefixes it holds (a handover, dated from just after its
    /// last poll): flows to any other address need not wait for it.
    fn timing(&self) -> Timing {
        Timing::Polled {
            period: self.settings.interval,
        }
    }

    fn run(
        mut self: Box<Self>,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        let interval_ns = u64::try_from(self.settings.interval.as_nanos()).unwrap_or(u64::MAX);
        Box::pin(async move {
            let mut failed_in_row = 0u32;
            loop {
                let started = Instant::now();
                // The poll's start is the time of what it sees: anything that changed before
                // it is in the answers (see the crate docs). Never less than `interval` after
                // the last good poll, even if the wall clock was slewed or stepped back since
                // (polls are scheduled on the monotonic clock): that is the promise of
                // `Timing::Polled`, which lets flows to addresses this source does not hold go
                // out without waiting for its next poll.
                let at_ns = match self.applied_at {
                    Some(last) => now_ns().max(last.saturating_add(interval_ns)),
                    None => now_ns(),
                };
                let polled = tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    polled = self.poll(at_ns) => polled,
                };
                let next = match polled {
                    Ok(batch) => {
                        failed_in_row = 0;
                        if !send_all(&changes, batch).await {
                            return Ok(());
                        }
                        started + self.settings.interval
                    }
                    Err(_) => {
                        failed_in_row = failed_in_row.saturating_add(1);
                        Instant::now() + self.backoff(failed_in_row)
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep_until(next) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .build();
        let source = Ec2Source::new(
            aws_sdk_ec2::Client::from_conf(conf),
            Ec2Settings {
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(10),
                ..Ec2Settings::default()
            },
        );
        for (failures, full) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (60, 10)] {
            let full = Duration::from_secs(full);
            for _ in 0..50 {
                let wait = source.backoff(failures);
                assert!(
                    wait >= full / 2 && wait <= full,
                    "{failures} failures: {wait:?} outside [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
    }
}
