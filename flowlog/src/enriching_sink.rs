//! The embedded mode's output: the agent's records are attributed in-process (no Kafka) and
//! written to Parquet, and every enriched flow feeds the live summary.
//!
//! Attribution is the enricher's own stage ([`Attributor`]) with this host's inventory: its
//! addresses, its cgroups (the local end of a flow is the container or unit of the process on
//! the socket) and optional static files. Held flows wait, as in the enricher, for the
//! inventory to catch up; `close` (Ctrl-C) attributes what is still held and closes the files.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use flowlog_enricher::{
    attribute::Attributor,
    storage::{ParquetSink, StorageError},
};
use flowlog_identity::{CgroupResolver, SharedIndex};
use flowlog_record::{EnrichedFlow, FlowRecord};
use flowlog_sidecar::sink::{RecordSink, SinkError};

use crate::summary::Summary;

/// Attributes records and writes them to Parquet.
pub struct EnrichingSink {
    attributor: Attributor<()>,
    parquet: ParquetSink,
    target: String,
    summary: Summary,
    ready: Vec<(EnrichedFlow, ())>,
}

impl EnrichingSink {
    pub fn new(
        index: SharedIndex,
        cgroups: Arc<CgroupResolver>,
        hold: Duration,
        parquet: ParquetSink,
        target: String,
        summary: Summary,
    ) -> Self {
        Self {
            attributor: Attributor::new(index, Some(cgroups), hold),
            parquet,
            target,
            summary,
            ready: Vec::new(),
        }
    }

    fn failed(&self, e: StorageError) -> SinkError {
        SinkError::Output {
            target: self.target.clone(),
            source: Box::new(e),
        }
    }

    /// Writes the attributed flows and rolls the files when due.
    async fn write_ready(&mut self) -> Result<(), SinkError> {
        let mut written = Ok(());
        for (flow, ()) in self.ready.drain(..) {
            self.summary.observe(&flow);
            if written.is_ok() {
                written = self.parquet.write(&flow);
            }
        }
        written.map_err(|e| self.failed(e))?;
        self.summary
            .tick(self.parquet.durable(), self.attributor.held());
        match self.parquet.maybe_roll(Instant::now()).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }
}

impl RecordSink for EnrichingSink {
    async fn write(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        let now = Instant::now();
        for record in records {
            self.attributor
                .push(record.clone(), (), now, &mut self.ready);
        }
        self.write_ready().await
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.attributor.release(Instant::now(), &mut self.ready);
        self.write_ready().await
    }

    async fn idle(&mut self) -> Result<(), SinkError> {
        self.flush().await
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        // The inventory still runs: held flows get their hold (the last ones ended just now).
        while let Some(deadline) = self.attributor.next_deadline() {
            let now = Instant::now();
            if deadline <= now {
                break;
            }
            self.attributor.release(now, &mut self.ready);
            tokio::time::sleep(Duration::from_millis(50).min(deadline - now)).await;
        }
        self.attributor.release_all(&mut self.ready);
        self.write_ready().await?;
        if let Err(e) = self.parquet.roll().await {
            return Err(self.failed(e));
        }
        self.summary.finish(self.parquet.durable());
        Ok(())
    }
}
