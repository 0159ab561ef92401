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
//! A handover — the old owner releases an address and a new owner takes it between two polls at
//! `p` and `t` — is seen by the poll at `t`, and happened at some unseen time in between. The old
//! owner's Close is dated `t` and the new owner's Open `p + 1`, so the two tenures overlap over
//! `(p, t)`: a flow in between is `ambiguous`, naming both, rather than given to the old owner
//! by a guess. An address only released (or only taken) between two polls changes at `t`: flows
//! in between keep its previous state, as no other owner is possible. A shorter
//! `--ec2-interval` narrows these windows at the cost of API calls (EC2 throttles per account
//! and region).
//!
//! # Which flows wait for a poll
//! The source is [`Timing::Polled`](flowlog_identity::Timing): its polls start at least
//! `interval` apart (a poll is dated no earlier than the last good one plus `interval`, even if
//! the wall clock stepped back), and until its next poll nothing it reports can change the owner
//! of an address it does not hold. So the enricher holds a flow for EC2 only if the flow's
//! address is in a prefix EC2 held after its last poll (the next poll may reveal a handover), or
//! if the flow started after the next poll was due — for at most `interval` plus `--hold`, then
//! the flow's end is `unknown`. Flows to other addresses go out without waiting for EC2.
//!
//! The first poll opens everything at its own time: flows older than the enricher's first poll
//! (a backlog read from Kafka) find no EC2 owner.
//!
//! # Failures
//! A poll counts only if every page of both calls succeeded. A failed poll (throttling, network,
//! permissions) is counted in `flowlog_identity_source_errors_total{source="ec2",kind}`, logged
//! once while it lasts (then once a minute, then its recovery), closes nothing — an incomplete
//! view must not clear the index — and sends no watermark, so the enricher holds flows to the
//! addresses EC2 holds, and every flow newer than the next poll's due time, rather than
//! attribute them from a stale view. The next attempt waits
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
pub mod metrics;
pub mod snapshot;
pub mod source;

pub use aws_sdk_ec2;
pub use client::{ClientOptions, StaticCredentials, build_client};
pub use error::{Ec2Error, ErrorKind};
pub use source::{Ec2Settings, Ec2Source};

/// The source name in changes, watermarks and identities.
pub const EC2_SOURCE: &str = "ec2";
