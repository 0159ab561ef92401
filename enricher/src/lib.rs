//! flowlog's enricher: consumes flow records from `flows.raw`, attributes the local and remote
//! end of each flow to the workload that owned the address **as of the flow's time**, and writes
//! the enriched flows to `flows.enriched` and to Parquet files.

pub mod storage;
