//! The EC2 inventory source: who owned each address of a VPC, as seen by polling the EC2 API.
//!
//! Every `interval` (`--ec2-interval`, default 30 s) [`Ec2Source`] reads every page of
//! DescribeNetworkInterfaces — the source of truth for addresses: each ENI's private IPv4
//! addresses (primary and secondary), delegated prefixes, IPv6 addresses and associated public or
//! Elastic IPs — and every page of DescribeInstances, for the names and tags of the instances the
//! ENIs are attached to (one call per poll, not one per ENI). It names each address's owner
//! (an `instance`, a `load_balancer` or a bare `network_interface`, see [`snapshot`]), diffs the
//! view with the previous one and sends Opens and Closes, then a Watermark.
//!
//! # Times, and how wrong they can be
//! EC2 does not say when an address was assigned (an attachment's `AttachTime` is the
//! attachment's, not the address's), so the poll is the measurement: a change is dated at the
//! start of the first poll that sees it. An address taken at `t` opens at the first poll start
//! after it, and one released at `t` closes at the first poll start after it: both ends are up
//! to one interval (plus a poll's duration) late, and may be up to a poll's duration early (a
//! change made while the poll runs, before its read, is dated at the poll's start).
//!
//! A handover — the old owner releases an address and a new owner takes it between two polls —
//! is seen by one poll: the old owner's Close and the new owner's Open carry the same time `t`,
//! so the intervals are `[from, t)` and `[t, ..)` and never overlap (never an ambiguous answer),
//! but flows in the unseen gap between the real handover and `t` are attributed to the **old**
//! owner. That is the known limit of polling; a shorter `--ec2-interval` narrows the gap at the
//! cost of API calls (EC2 throttles per account and region).
//!
//! The first poll opens everything at its own time: flows older than the enricher's first poll
//! (a backlog read from Kafka) find no EC2 owner.
//!
//! # Failures
//! A poll counts only if every page of both calls succeeded. A failed poll (throttling, network,
//! permissions) is counted in `flowlog_identity_source_errors_total{source="ec2",kind}`, logged
//! once while it lasts (then once a minute, then its recovery), closes nothing — an incomplete
//! view must not clear the index — and sends no watermark, so the enricher holds flows newer
//! than the last good poll rather than attribute them from a stale view. The next attempt waits
//! an exponential backoff with jitter (capped), on top of the SDK's own per-call retries. The
//! watermark of a good poll is its start, not its end: a change made during the poll may have
//! been missed.
//!
//! # Use
//! ```no_run
//! # async fn example() {
//! use flowlog_ec2::{ClientOptions, Ec2Settings, Ec2Source, build_client};
//! let client = build_client(&ClientOptions { region: Some("eu-west-1".into()), ..Default::default() }).await;
//! let source = Ec2Source::new(client, Ec2Settings::default());
//! // Then, like every source: flowlog_identity::spawn_source(Box::new(source), changes, shutdown),
//! // after index.register_source(flowlog_ec2::EC2_SOURCE).
//! # }
//! ```
pub mod client;
pub mod error;
pub mod snapshot;
pub mod source;

pub use aws_sdk_ec2;
pub use client::{ClientOptions, StaticCredentials, build_client};
pub use error::{Ec2Error, ErrorKind};
pub use source::{Ec2Settings, Ec2Source};

/// The source name in changes, watermarks and identities.
pub const EC2_SOURCE: &str = "ec2";
