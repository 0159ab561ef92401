//! flowlog's enricher: consumes flow records from `flows.raw`, attributes the local and remote
//! end of each flow to the workload that owned the address **as of the flow's time**, and writes
//! the enriched flows to `flows.enriched` and to Parquet files.
//!
//! Modules, in data-flow order: [`kafka`] (the consumer group and the producer), [`attribute`]
//! (index lookups at the flow's start, the hold), [`storage`] (Parquet files, local or S3),
//! [`offsets`] (which input offsets are durable in every output), [`pipeline`] (the loop that
//! wires them), [`inventory`] (starting the identity sources that feed the index), [`ownership`]
//! (the `flows.ownership` topic: one inventory process publishes, every replica follows),
//! [`metrics`]. The publishing process, `flowlog-inventory`, is a package of its own that uses
//! this library: the topic's two sides stay in one place, and so do the source flags, metric
//! names and signal handling the two binaries share.
//!
//! Cargo features (all on by default, as the enricher's binary needs them): `kafka` ([`kafka`],
//! [`pipeline`], [`ownership`]: librdkafka), `ec2` and `kubernetes` (those inventory sources in
//! [`source_flags`]: the AWS SDK, kube). Attribution, storage and the inventory's start need
//! none, which is what the one-host `flowlog` uses: it builds without librdkafka, the AWS SDK
//! and kube.
pub mod attribute;
pub mod inventory;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod offsets;
#[cfg(feature = "kafka")]
pub mod ownership;
#[cfg(feature = "kafka")]
pub mod pipeline;
pub mod source_flags;
pub mod storage;
