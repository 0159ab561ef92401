//! Which files a window reads. flowlog writes each record into the hive partition
//! `dt=YYYY-MM-DD/hour=HH/` of its `end_ns` (UTC; `flowlog-enricher`'s storage), so a window's
//! records are in the hours it covers, and only those directories are listed and read: a
//! report over the last hour of a year of data reads an hour or three of it, locally or on S3.
//!
//! A connection's records lie between its start and its end, and its counters are deltas
//! spread over them (interim records), so the hours read are widened by a margin on each side
//! (`--margin`, default 1 h) and by the clock skew allowed between its two ends: a connection
//! that overlaps the window and lies within the margin of it is counted whole, exactly as the
//! shipped SQL counts it over all files. A connection that reaches further outside (open for
//! longer than the margin beyond the window) is counted from its records inside the margin.
//! Reports that compare with the window before (availability, audit) read that one's hours too.
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveTime};
use datafusion::{
    datasource::listing::ListingTableUrl, error::DataFusionError, prelude::SessionContext,
};
use futures::TryStreamExt as _;
use object_store::{ObjectMeta, ObjectStore, path::Path};
use url::Url;

use crate::{BoxError, ReportError, Request, sql::previous_from_ns};

const HOUR_NS: u64 = 3_600_000_000_000;

/// The times whose hour partitions are read, inclusive, ns since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first_ns: u64,
    pub last_ns: u64,
}

impl Span {
    /// Whether the hour starting at `hour_start_ns` holds records of the span.
    fn holds_hour(&self, hour_start_ns: u64) -> bool {
        hour_start_ns <= self.last_ns && hour_start_ns.saturating_add(HOUR_NS) > self.first_ns
    }
}

/// The span of partitions that `request` reads: its window (and the one before, for the reports
/// that compare), widened by the skew and the margin on each side.
pub fn span(request: &Request) -> Span {
    let start = if request.report.reads_previous_window() {
        previous_from_ns(request.from_ns, request.to_ns)
    } else {
        request.from_ns
    };
    let widen = request.skew.saturating_add(request.margin).as_nanos();
    let widen = u64::try_from(widen).unwrap_or(u64::MAX);
    Span {
        first_ns: start.saturating_sub(widen),
        last_ns: request.to_ns.saturating_add(widen),
    }
}

/// Where the Parquet files are: the store DataFusion reads them through and the directory (a
/// key prefix on S3) under which the `dt=` partitions are.
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    base: ListingTableUrl,
    display: String,
}

impl Location {
    /// Opens `data`: a local directory (must exist), `file:///dir` or `s3://bucket/prefix`.
    pub fn open(ctx: &SessionContext, data: &str) -> Result<Self, ReportError> {
        let error = |source: BoxError| ReportError::Location {
            location: data.to_string(),
            source,
        };
        let base = if data.starts_with("s3://") {
            register_s3(ctx, data).map_err(error)?
        } else {
            let dir = match data.strip_prefix("file://") {
                Some(path) => std::path::PathBuf::from(path),
                None => std::path::PathBuf::from(data),
            };
            let dir = dir.canonicalize().map_err(|e| error(Box::new(e)))?;
            if !dir.is_dir() {
                return Err(error("not a directory".into()));
            }
            let url = Url::from_directory_path(&dir)
                .map_err(|()| error("not an absolute path".into()))?;
            ListingTableUrl::parse(url.as_str()).map_err(|e| error(Box::new(e)))?
        };
        let store = ctx
            .runtime_env()
            .object_store(base.object_store())
            .map_err(|e| error(Box::new(e)))?;
        Ok(Self {
            store,
            base,
            display: data.to_string(),
        })
    }

    /// The `dt=…/hour=…` directories under the location whose hour holds records of `span`,
    /// in time order. Listed two levels deep with a delimiter, so that no other hour's files
    /// are listed, let alone read.
    pub async fn hour_dirs(&self, span: &Span) -> Result<Vec<Path>, ReportError> {
        let day = |ns: u64| DateTime::from_timestamp_nanos(i64::try_from(ns).unwrap_or(i64::MAX));
        let (first_day, last_day) = (
            day(span.first_ns).date_naive(),
            day(span.last_ns).date_naive(),
        );
        let mut dirs = Vec::new();
        for day_dir in self.subdirs(self.base.prefix()).await? {
            let Some(date) = partition_value(&day_dir, "dt")
                .and_then(|v| NaiveDate::parse_from_str(v, "%Y-%m-%d").ok())
            else {
                continue;
            };
            if date < first_day || date > last_day {
                continue;
            }
            let midnight = date
                .and_time(NaiveTime::MIN)
                .and_utc()
                .timestamp_nanos_opt();
            let Some(midnight) = midnight.and_then(|ns| u64::try_from(ns).ok()) else {
                continue;
            };
            for hour_dir in self.subdirs(&day_dir).await? {
                let Some(hour) = partition_value(&hour_dir, "hour")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|h| *h < 24)
                else {
                    continue;
                };
                if span.holds_hour(midnight + hour * HOUR_NS) {
                    dirs.push((midnight + hour * HOUR_NS, hour_dir));
                }
            }
        }
        dirs.sort();
        Ok(dirs.into_iter().map(|(_, dir)| dir).collect())
    }

    /// The Parquet files under `dirs` (at any depth, as DataFusion lists a table's paths).
    pub async fn files(&self, dirs: &[Path]) -> Result<Vec<ObjectMeta>, ReportError> {
        let mut files = Vec::new();
        for dir in dirs {
            let listed: Vec<ObjectMeta> = self
                .store
                .list(Some(dir))
                .try_collect()
                .await
                .map_err(|source| self.list_error(source))?;
            files.extend(
                listed
                    .into_iter()
                    .filter(|o| o.size > 0 && o.location.as_ref().ends_with(".parquet")),
            );
        }
        Ok(files)
    }

    /// The URL DataFusion lists `dir` by (a directory: a trailing slash).
    pub fn url_of(&self, dir: &Path) -> Result<ListingTableUrl, DataFusionError> {
        let mut url: Url = AsRef::<Url>::as_ref(&self.base).clone();
        url.set_path(&format!("/{dir}/"));
        ListingTableUrl::parse(url.as_str())
    }

    async fn subdirs(&self, under: &Path) -> Result<Vec<Path>, ReportError> {
        let listed = self
            .store
            .list_with_delimiter(Some(under))
            .await
            .map_err(|source| self.list_error(source))?;
        Ok(listed.common_prefixes)
    }

    fn list_error(&self, source: object_store::Error) -> ReportError {
        ReportError::List {
            location: self.display.clone(),
            source,
        }
    }
}

/// `value` of a directory named `name=value`.
fn partition_value<'a>(dir: &'a Path, name: &str) -> Option<&'a str> {
    dir.filename()?.strip_prefix(name)?.strip_prefix('=')
}

/// Registers an S3 client for the bucket of `data` (`s3://bucket/prefix`) with DataFusion, from
/// the standard `AWS_*` environment variables (`AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP=true`
/// for an S3-compatible store), and returns the prefix as a directory URL.
#[cfg(feature = "s3")]
fn register_s3(ctx: &SessionContext, data: &str) -> Result<ListingTableUrl, BoxError> {
    let url = Url::parse(data)?;
    let bucket = url.host_str().ok_or("no bucket in the URL")?;
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()?;
    let bucket_url = Url::parse(&format!("s3://{bucket}"))?;
    ctx.register_object_store(&bucket_url, Arc::new(store));
    let dir = format!("{}/", data.trim_end_matches('/'));
    Ok(ListingTableUrl::parse(dir)?)
}

#[cfg(not(feature = "s3"))]
fn register_s3(_: &SessionContext, _: &str) -> Result<ListingTableUrl, BoxError> {
    Err("this build of flowlog-report has no S3 support (feature `s3`)".into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Filters, Report};

    #[test]
    fn the_span_widens_the_window_and_reaches_back_for_comparisons() {
        let mut r = Request {
            report: Report::Capacity,
            data: String::new(),
            from_ns: 10 * HOUR_NS,
            to_ns: 12 * HOUR_NS,
            skew: Duration::from_secs(1),
            price_per_gb: 0.01,
            margin: Duration::from_secs(3600),
            filters: Filters::default(),
        };
        let s = span(&r);
        assert_eq!(s.first_ns, 9 * HOUR_NS - 1_000_000_000);
        assert_eq!(s.last_ns, 13 * HOUR_NS + 1_000_000_000);
        assert!(!s.holds_hour(7 * HOUR_NS));
        assert!(s.holds_hour(8 * HOUR_NS));
        assert!(s.holds_hour(13 * HOUR_NS));
        assert!(!s.holds_hour(14 * HOUR_NS));
        r.report = Report::Availability;
        assert_eq!(span(&r).first_ns, 7 * HOUR_NS - 1_000_000_000);
        r.from_ns = 0;
        assert_eq!(span(&r).first_ns, 0);
    }
}
