//! flowlog's enricher: consumes flow records from `flows.raw`, attributes the local and remote
//! end of each flow to the workload that owned the address **as of the flow's time**, and writes
//! the enriched flows to `flows.enriched` and to Parquet files.
//!
//! Modules, in data-flow order: [`kafka`] (the consumer group and the producer), [`attribute`]
//! (index lookups at the flow's start, the hold), [`storage`] (Parquet files, local or S3),
//! [`offsets`] (which input offsets are durable in every output), [`pipeline`] (the loop that
//! wires them), [`inventory`] (starting the identity sources that feed the index), [`ownership`]
//! (the `flows.ownership` topic: one inventory process publishes, every replica follows),
//! [`metrics`].
pub mod attribute;
pub mod inventory;
pub mod kafka;
pub mod metrics;
pub mod offsets;
pub mod ownership;
pub mod pipeline;
pub mod source_flags;
pub mod storage;
