//! The enricher's Parquet output: enriched flows as zstd-compressed Parquet files in hourly
//! hive partitions (`dt=YYYY-MM-DD/hour=HH/`, from each flow's `end_ns`, UTC) of a local
//! directory or an S3-compatible bucket, readable by any engine (DuckDB, Spark, Trino/Athena,
//! pyarrow).
//!
//! Files are written in *generations*: every partition that receives rows has one open file,
//! encoded in memory; when any of them reaches `roll_bytes`, or `roll_interval` has passed
//! since the generation's first row, all of them are closed and uploaded together. That keeps
//! the delivery contract simple: [`ParquetSink::durable`] advances by whole generations, so it
//! is always a prefix of [`ParquetSink::written`], and the pipeline commits a Kafka offset only
//! once every record before it is in a complete, uploaded file. A file is never visible
//! incomplete (object stores' `put` is atomic) and never overwritten (names are unique per
//! process run and sequence).
//!
//! Sizes are the Parquet encoder's: bytes of the row groups already encoded plus its estimate
//! of the row group in progress, whose last pages and dictionaries are not compressed yet,
//! scaled by what earlier row groups of the sink really encoded to against that estimate, plus
//! the last footer's size (`partition::SizeModel`; the sink's first file to reach `roll_bytes`
//! ends its row group there to learn them). So files come out near `roll_bytes`, larger only
//! by the rows written between two `maybe_roll` calls or when their rows compress worse than
//! the earlier files' did.
//!
//! Submodules: [`schema`] (the columns), `partition` (partition paths and open files),
//! `store` (local or S3 target).
mod partition;
pub mod schema;
mod store;

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use flowlog_diag::error_chain;
use flowlog_record::enriched::EnrichedFlow;
use object_store::ObjectStoreExt;
use tracing::{info, warn};

pub use partition::PartitionKey;
pub use schema::enriched_flow_schema;
pub use store::S3Options;

use partition::{ClosedFile, OpenFile, SizeModel};
use store::Target;

use crate::metrics as m;

/// Registers the descriptions of the storage metrics with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(m::PARQUET_FILES, "Parquet files written completely");
    metrics::describe_counter!(m::PARQUET_ROWS, "rows in the Parquet files written");
    metrics::describe_counter!(
        m::PARQUET_BYTES,
        metrics::Unit::Bytes,
        "bytes of the Parquet files written"
    );
    metrics::describe_counter!(
        m::PARQUET_UPLOAD_ERRORS,
        "failed attempts to upload a Parquet file (every one is retried)"
    );
}

/// Errors of the Parquet output. Each names the URL or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("parquet output `{url}`: {reason}")]
    Config { url: String, reason: String },
    #[error("parquet output `{url}`: not a valid file URL")]
    Url {
        url: String,
        source: url::ParseError,
    },
    #[error("parquet output `{url}`: not a valid key prefix")]
    Prefix {
        url: String,
        source: object_store::path::Error,
    },
    #[error("parquet output `{url}`: cannot create directory {}", dir.display())]
    CreateDir {
        url: String,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("parquet output `{url}`: cannot open the object store")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("parquet output `{url}` is not writable (a test object could not be written)")]
    NotWritable {
        url: String,
        source: object_store::Error,
    },
    #[error("building Arrow columns for parquet file {file}")]
    Arrow {
        file: String,
        source: arrow_schema::ArrowError,
    },
    #[error("encoding parquet file {file}")]
    Encode {
        file: String,
        source: parquet::errors::ParquetError,
    },
    /// An encoding error left rows that can never become durable: the sink takes no more rows,
    /// so that `durable()` cannot count past them. Restart from committed offsets. Every call
    /// after it returns the same cause.
    #[error("parquet output `{url}` takes no more rows")]
    Poisoned {
        url: String,
        source: Arc<StorageError>,
    },
}

/// Where and when to write Parquet files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetSettings {
    /// `file:///abs/dir`, a plain directory path (created if missing), or
    /// `s3://bucket/prefix` (the bucket must exist).
    pub url: String,
    /// Roll all open files when any reaches this size (encoded bytes, estimated while open).
    pub roll_bytes: u64,
    /// Roll all open files this long after the first row of their generation.
    pub roll_interval: Duration,
    pub s3: S3Options,
}

impl ParquetSettings {
    /// 128 MiB: files large enough for efficient scans, small enough to hold in memory.
    pub const DEFAULT_ROLL_BYTES: u64 = 128 << 20;
    /// A minute: bounds how far the committed offsets (and the files) trail the stream.
    pub const DEFAULT_ROLL_INTERVAL: Duration = Duration::from_secs(60);

    /// Settings with the default roll size and interval and S3 options from the environment.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            roll_bytes: Self::DEFAULT_ROLL_BYTES,
            roll_interval: Self::DEFAULT_ROLL_INTERVAL,
            s3: S3Options::default(),
        }
    }
}

/// First wait after a failed upload; doubled after each further failure up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Least time between two log lines about one run of failed uploads.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The files of one closed generation that are not uploaded yet.
struct Generation {
    files: VecDeque<ClosedFile>,
    /// Rows of the whole generation: they become durable together, when its last file is up.
    rows: u64,
}

/// Writes enriched flows to Parquet files (see the module documentation).
///
/// Not thread-safe by design: one pipeline task owns it, calls [`ParquetSink::write`] for each
/// flow and [`ParquetSink::maybe_roll`] regularly (after each batch and on a timer), and
/// commits Kafka offsets up to [`ParquetSink::durable`].
pub struct ParquetSink {
    url: String,
    target: Target,
    roll_bytes: u64,
    roll_interval: Duration,
    /// Unique per process run: part of every file name, so that concurrent enrichers (and a
    /// restarted one) never pick the same name.
    run_id: String,
    next_seq: u64,
    open: BTreeMap<PartitionKey, OpenFile>,
    /// When the current generation's first row was written.
    generation_start: Option<Instant>,
    /// Closed generations in order, waiting for their uploads.
    closed: VecDeque<Generation>,
    written: u64,
    durable: u64,
    /// What the files so far encoded to, for the sizes of the open ones.
    size_model: SizeModel,
    /// The first encoding error (see [`StorageError::Poisoned`]).
    poisoned: Option<Arc<StorageError>>,
    /// The current run of failed uploads; kept across calls, so that an outage is logged
    /// once (then once a minute) however often a cancelled roll is resumed.
    retry: RetryState,
}

/// Failed uploads since the last success.
#[derive(Debug)]
struct RetryState {
    failures: u64,
    backoff: Duration,
    last_log: Option<Instant>,
}

impl Default for RetryState {
    fn default() -> Self {
        Self {
            failures: 0,
            backoff: FIRST_BACKOFF,
            last_log: None,
        }
    }
}

impl std::fmt::Debug for ParquetSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetSink")
            .field("url", &self.url)
            .field("run_id", &self.run_id)
            .field("open_files", &self.open.len())
            .field("written", &self.written)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

impl ParquetSink {
    /// Opens the target and proves it takes writes (a clear error naming the URL if not: a
    /// path under a file, a bucket that does not exist, wrong credentials, an unreachable
    /// endpoint).
    pub async fn open(settings: ParquetSettings) -> Result<Self, StorageError> {
        let url = settings.url;
        let target = store::open(&url, &settings.s3)?;
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        store::check_writable(&target, &url, &run_id).await?;
        info!(url, run_id, "parquet output ready");
        Ok(Self {
            url,
            target,
            roll_bytes: settings.roll_bytes,
            roll_interval: settings.roll_interval,
            run_id,
            next_seq: 0,
            open: BTreeMap::new(),
            generation_start: None,
            closed: VecDeque::new(),
            written: 0,
            durable: 0,
            size_model: SizeModel::default(),
            poisoned: None,
            retry: RetryState::default(),
        })
    }

    /// The identifier in this run's file names (`<run_id>-<sequence>.parquet`).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Buffers one flow in its partition's open file. Returns quickly: rows are encoded in
    /// memory in batches of a few thousand; nothing is uploaded here.
    pub fn write(&mut self, flow: &EnrichedFlow) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let result = self.write_inner(flow);
        self.poison_on_error(result)
    }

    fn write_inner(&mut self, flow: &EnrichedFlow) -> Result<(), StorageError> {
        let key = PartitionKey::of_ns(flow.flow.end_ns);
        let file = match self.open.entry(key) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let name = format!("{}-{:06}.parquet", self.run_id, self.next_seq);
                let file = OpenFile::new(key.dir(&self.target.prefix).join(name))?;
                self.next_seq += 1;
                e.insert(file)
            }
        };
        file.append(flow)?;
        self.generation_start.get_or_insert_with(Instant::now);
        self.written += 1;
        Ok(())
    }

    /// Records passed to [`ParquetSink::write`] so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Records that are in complete, uploaded files: the first `durable()` of the
    /// `written()` records, in the order they were written.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The estimated size of the largest open file, in encoded bytes (rows not encoded yet
    /// are estimated; see [`ParquetSink::maybe_roll`]).
    pub fn largest_open_bytes(&self) -> u64 {
        self.open
            .values()
            .map(|f| f.size(&self.size_model))
            .max()
            .unwrap_or(0)
    }

    /// Files open in the current generation (one per partition that received rows).
    pub fn open_files(&self) -> usize {
        self.open.len()
    }

    /// Rolls when any open file has reached `roll_bytes` or `roll_interval` has passed at
    /// `now` since the generation's first row; also finishes uploads that an earlier,
    /// cancelled roll left behind. Call it after each batch of writes and on a timer.
    ///
    /// Sizes are encoded sizes: when a file's estimate (which counts rows not yet encoded at
    /// an estimated size) reaches `roll_bytes`, its rows are encoded first and the roll
    /// happens only if the encoded size still reaches it. So after a call that did not roll,
    /// [`ParquetSink::largest_open_bytes`] is below `roll_bytes`.
    pub async fn maybe_roll(&mut self, now: Instant) -> Result<(), StorageError> {
        self.check_poisoned()?;
        match self.roll_due(now) {
            Ok(true) => self.roll().await,
            Ok(false) => {
                self.upload_closed().await;
                Ok(())
            }
            Err(e) => {
                let e = self.poison(e);
                // Generations closed before the error are still a prefix: upload them anyway.
                self.upload_closed().await;
                Err(e)
            }
        }
    }

    fn roll_due(&mut self, now: Instant) -> Result<bool, StorageError> {
        let Some(start) = self.generation_start else {
            return Ok(false);
        };
        if now.saturating_duration_since(start) >= self.roll_interval {
            return Ok(true);
        }
        let model = &mut self.size_model;
        for file in self.open.values_mut() {
            if file.size(model) >= self.roll_bytes && file.has_pending() {
                file.encode_pending()?;
            }
            if file.size(model) >= self.roll_bytes && !model.calibrated() {
                // The first time: encode the row group to learn what the estimate of one
                // comes to, and judge the file by that.
                file.flush_row_group(model)?;
            }
            if file.size(model) >= self.roll_bytes {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Closes every open file and uploads it (and any earlier files still waiting), then
    /// returns with all written records durable. For shutdown and partition revocation.
    ///
    /// A failed upload is retried with backoff until it succeeds (counted in
    /// `flowlog_enricher_parquet_upload_errors_total`, logged once and then at most once a
    /// minute), never dropped. Cancel-safe: if the future is dropped, closed files stay queued
    /// and the next `roll`/`maybe_roll` uploads them (a re-upload of the same name writes the
    /// same bytes). An error means a file could not be encoded; its rows stay undurable.
    pub async fn roll(&mut self) -> Result<(), StorageError> {
        self.check_poisoned()?;
        if let Err(e) = self.close_generation() {
            let e = self.poison(e);
            // Generations closed before the error are still a prefix: upload them anyway.
            self.upload_closed().await;
            return Err(e);
        }
        self.upload_closed().await;
        Ok(())
    }

    fn check_poisoned(&self) -> Result<(), StorageError> {
        match &self.poisoned {
            Some(cause) => Err(StorageError::Poisoned {
                url: self.url.clone(),
                source: Arc::clone(cause),
            }),
            None => Ok(()),
        }
    }

    /// Remembers `error`, which loses rows, so that no later roll advances `durable` past them;
    /// returns it as the [`StorageError::Poisoned`] every later call returns too.
    fn poison(&mut self, error: StorageError) -> StorageError {
        let cause = Arc::new(error);
        self.poisoned = Some(Arc::clone(&cause));
        StorageError::Poisoned {
            url: self.url.clone(),
            source: cause,
        }
    }

    /// [`Self::poison`] on an error.
    fn poison_on_error(&mut self, result: Result<(), StorageError>) -> Result<(), StorageError> {
        result.map_err(|e| self.poison(e))
    }

    /// Turns the open files into a closed generation (no await: never half done).
    fn close_generation(&mut self) -> Result<(), StorageError> {
        if self.open.is_empty() {
            return Ok(());
        }
        let open = std::mem::take(&mut self.open);
        self.generation_start = None;
        let mut files = VecDeque::with_capacity(open.len());
        let mut rows = 0;
        for file in open.into_values() {
            rows += file.rows;
            files.push_back(file.close(&mut self.size_model)?);
        }
        self.closed.push_back(Generation { files, rows });
        Ok(())
    }

    /// Uploads the closed generations in order, retrying each failed upload until it
    /// succeeds; advances `durable` as each generation completes.
    async fn upload_closed(&mut self) {
        while let Some(generation) = self.closed.front_mut() {
            let Some(file) = generation.files.front() else {
                self.durable += generation.rows;
                self.closed.pop_front();
                continue;
            };
            let len = file.len;
            match self
                .target
                .store
                .put(&file.path, file.payload.clone())
                .await
            {
                Ok(_) => {
                    metrics::counter!(m::PARQUET_FILES).increment(1);
                    metrics::counter!(m::PARQUET_ROWS).increment(file.rows);
                    metrics::counter!(m::PARQUET_BYTES).increment(len);
                    if self.retry.failures > 0 {
                        info!(
                            url = %self.url,
                            file = %file.path,
                            failures = self.retry.failures,
                            "parquet upload succeeded after failed attempts"
                        );
                        self.retry = RetryState::default();
                    }
                    generation.files.pop_front();
                }
                Err(e) => {
                    let retry = &mut self.retry;
                    retry.failures += 1;
                    metrics::counter!(m::PARQUET_UPLOAD_ERRORS).increment(1);
                    if retry.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                        retry.last_log = Some(Instant::now());
                        warn!(
                            url = %self.url,
                            file = %file.path,
                            failures = retry.failures,
                            error = %error_chain(&e),
                            "parquet upload failed; retrying with backoff until it succeeds"
                        );
                    }
                    let wait = retry.backoff;
                    retry.backoff = (retry.backoff * 2).min(MAX_BACKOFF);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_128_mib_and_a_minute() {
        let s = ParquetSettings::new("/var/lib/flowlog/parquet");
        assert_eq!(s.roll_bytes, 134_217_728);
        assert_eq!(s.roll_interval, Duration::from_secs(60));
        assert_eq!(s.s3, S3Options::default());
    }

    #[test]
    fn s3_secrets_are_not_in_debug_output() {
        let s = S3Options {
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("wJalrXUtnFEMI".into()),
            session_token: Some("FwoGZXIvYXdzE".into()),
            ..S3Options::default()
        };
        let text = format!("{s:?}");
        assert!(text.contains("AKIDEXAMPLE"), "{text}");
        assert!(!text.contains("wJalrXUtnFEMI"), "{text}");
        assert!(!text.contains("FwoGZXIvYXdzE"), "{text}");
    }
}
