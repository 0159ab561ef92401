//! flowlog's reports over the enriched Parquet files, with Apache DataFusion: one row per TCP
//! connection (`connections`), per service pair (`availability`), per edge (`audit`), per
//! workload pair and hour (`capacity`). They give the same answers as the shipped DuckDB and
//! ClickHouse SQL under `analysis/` (the analysis test requires it); the DataFusion SQL is in
//! `sql/` beside this crate.
//!
//! Only the hive partitions (`dt=YYYY-MM-DD/hour=HH/`, from each record's `end_ns`) of the
//! window are read, widened by a margin so that connections crossing the window's edges are
//! counted whole ([`partitions`]).
//!
//! Modules: [`time`] (the window's bounds from the command line), [`partitions`] (which files
//! a window reads), [`sql`] (the report's statements), [`output`] (table, CSV, JSON), [`html`]
//! (the page: a service map, bytes by hour and the three reports' tables).
pub mod html;
pub mod output;
pub mod partitions;
pub mod sql;
pub mod time;

use std::{fmt, sync::Arc, time::Duration};

use datafusion::{
    datasource::{
        file_format::{FileFormat as _, parquet::ParquetFormat},
        listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl},
    },
    error::DataFusionError,
    prelude::SessionContext,
};
use tracing::{debug, info};

pub use output::{Format, Rows};
pub use sql::Filters;

/// The questions `flowlog report` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// One row per TCP connection, its two ends joined.
    Connections,
    /// Per service pair: connections, failed connects, resets, retransmit rate, RTT
    /// percentiles, and whether it got worse than in the window before.
    Availability,
    /// Per edge: first/last seen, connections, bytes, unowned or inexact ends, new edges.
    Audit,
    /// Per hour and workload pair: bytes each way, cross-zone bytes and their cost.
    Capacity,
}

impl Report {
    pub const ALL: [Report; 4] = [
        Report::Connections,
        Report::Availability,
        Report::Audit,
        Report::Capacity,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Report::Connections => "connections",
            Report::Availability => "availability",
            Report::Audit => "audit",
            Report::Capacity => "capacity",
        }
    }

    /// Whether the report compares the window with the one of the same length just before it
    /// (and so reads that one's partitions too).
    pub fn reads_previous_window(self) -> bool {
        matches!(self, Report::Availability | Report::Audit)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What went wrong, and with which input.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "the data location {location:?} cannot be read (expected flowlog's output directory, \
         file:///dir or s3://bucket/prefix)"
    )]
    Location {
        location: String,
        #[source]
        source: BoxError,
    },
    #[error("listing the partitions under {location}")]
    List {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "no Parquet files under {location} in the partitions of {from} .. {to} (hours {first} .. {last}, UTC)"
    )]
    NoFiles {
        location: String,
        from: String,
        to: String,
        first: String,
        last: String,
    },
    #[error("reading the Parquet file {path}")]
    File {
        path: String,
        #[source]
        source: DataFusionError,
    },
    #[error(
        "{what} {input:?} is not a time (expected RFC 3339 such as 2026-12-07T22:00:00Z, a time \
         relative to now such as -1h, `now`, or ns since the epoch)"
    )]
    Time {
        what: &'static str,
        input: String,
        #[source]
        source: BoxError,
    },
    #[error("the window is empty: --from {from} is not before --to {to}")]
    EmptyWindow { from: String, to: String },
    #[error("running the {report} report")]
    Query {
        report: Report,
        #[source]
        source: DataFusionError,
    },
    #[error("writing the {format} output")]
    Write {
        format: Format,
        #[source]
        source: BoxError,
    },
}

/// The cause of an error, kept as itself (a chain prints it) rather than as text.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One report over one window.
#[derive(Debug, Clone)]
pub struct Request {
    pub report: Report,
    /// A directory, `file:///dir` or `s3://bucket/prefix` (credentials, region and endpoint
    /// from the standard `AWS_*` environment variables).
    pub data: String,
    /// The window `[from_ns, to_ns)`, ns since the epoch: connections that overlap it.
    pub from_ns: u64,
    pub to_ns: u64,
    /// How far two hosts' clocks may disagree: the two ends of a connection must overlap
    /// within it.
    pub skew: Duration,
    /// The price of a GB (2^30 bytes) crossing zones, charged in each direction (capacity).
    pub price_per_gb: f64,
    /// How far beyond the window's edges partitions are read, so that a connection crossing
    /// an edge is counted from all its records (see [`partitions`]).
    pub margin: Duration,
    pub filters: Filters,
}

/// Runs a report and returns its rows.
pub async fn run(request: &Request) -> Result<Rows, ReportError> {
    if request.from_ns >= request.to_ns {
        return Err(ReportError::EmptyWindow {
            from: time::display_ns(request.from_ns),
            to: time::display_ns(request.to_ns),
        });
    }
    let query = |source| ReportError::Query {
        report: request.report,
        source,
    };
    let ctx = SessionContext::new();
    let location = partitions::Location::open(&ctx, &request.data)?;
    let span = partitions::span(request);
    let dirs = location.hour_dirs(&span).await?;
    let files = location.files(&dirs).await?;
    if files.is_empty() {
        return Err(ReportError::NoFiles {
            location: request.data.clone(),
            from: time::display_ns(request.from_ns),
            to: time::display_ns(request.to_ns),
            first: time::display_ns(span.first_ns),
            last: time::display_ns(span.last_ns),
        });
    }
    info!(
        report = %request.report,
        partitions = dirs.len(),
        files = files.len(),
        "reading the window's partitions"
    );
    let state = ctx.state();
    let format = Arc::new(ParquetFormat::default());
    // Files written before a column was added lack it: the schema is every file's merged,
    // and DataFusion fills what a file lacks with nulls (DuckDB's `union_by_name`).
    let schema = match format.infer_schema(&state, &location.store, &files).await {
        Ok(schema) => schema,
        Err(error) => {
            // Name the file that cannot be read, not just the reason.
            for file in &files {
                let one = std::slice::from_ref(file);
                if let Err(source) = format.infer_schema(&state, &location.store, one).await {
                    return Err(ReportError::File {
                        path: file.location.to_string(),
                        source,
                    });
                }
            }
            return Err(query(error));
        }
    };
    let urls = dirs
        .iter()
        .map(|dir| location.url_of(dir))
        .collect::<Result<Vec<ListingTableUrl>, _>>()
        .map_err(query)?;
    let options = ListingOptions::new(format).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    let table = ListingTable::try_new(config).map_err(query)?;
    ctx.register_table(sql::FILES_TABLE, Arc::new(table))
        .map_err(query)?;

    for statement in sql::views(request) {
        debug!(%statement, "creating a view");
        ctx.sql(&statement).await.map_err(query)?;
    }
    let frame = ctx.sql(&sql::report(request)).await.map_err(query)?;
    let schema = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame.collect().await.map_err(query)?;
    Ok(Rows { schema, batches })
}
