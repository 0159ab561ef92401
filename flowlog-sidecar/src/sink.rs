//! Where flow records go. The agent writes through the [`RecordSink`] trait so that new outputs
//! (Kafka, next) slot in without touching capture.
use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use crate::record::FlowRecord;

/// Why a sink could not take records.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("opening {path} for flow records")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing flow records to {target}")]
    Write {
        target: String,
        source: std::io::Error,
    },
    /// An output implemented outside this crate failed (the embedded enricher's Parquet files).
    #[error("writing flow records to {target}")]
    Output {
        target: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// An output for flow records. `write` may buffer; `flush` makes everything written so far
/// durable in the sink's sense (on disk, on the terminal, acknowledged by a broker).
#[allow(async_fn_in_trait)]
pub trait RecordSink {
    /// Takes a batch of records, in order.
    async fn write(&mut self, records: &[FlowRecord]) -> Result<(), SinkError>;
    /// Pushes out everything buffered.
    async fn flush(&mut self) -> Result<(), SinkError>;
    /// Called on each turn of the agent's loop that produced no record (at least every
    /// `--drain-interval`): background work such as replaying the Kafka spool.
    async fn idle(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// Called once when the agent stops, after the last records were written: everything must
    /// be made durable now (close files, flush outputs).
    async fn close(&mut self) -> Result<(), SinkError> {
        self.flush().await
    }
}

/// JSON lines, one record per line, to any writer (stdout or a file).
pub struct JsonLines<W: Write> {
    out: BufWriter<W>,
    target: String,
}

impl JsonLines<std::io::Stdout> {
    pub fn stdout() -> Self {
        Self {
            out: BufWriter::with_capacity(64 * 1024, std::io::stdout()),
            target: "stdout".to_string(),
        }
    }
}

impl JsonLines<std::fs::File> {
    /// Appends to `path`, creating it if needed.
    pub fn file(path: &Path) -> Result<Self, SinkError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| SinkError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            out: BufWriter::with_capacity(64 * 1024, file),
            target: path.display().to_string(),
        })
    }
}

impl<W: Write> JsonLines<W> {
    fn io_err(&self, source: std::io::Error) -> SinkError {
        SinkError::Write {
            target: self.target.clone(),
            source,
        }
    }
}

impl<W: Write> RecordSink for JsonLines<W> {
    async fn write(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        for record in records {
            serde_json::to_writer(&mut self.out, record)
                .map_err(|e| self.io_err(std::io::Error::other(e)))?;
            self.out.write_all(b"\n").map_err(|e| self.io_err(e))?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|e| self.io_err(e))
    }
}
