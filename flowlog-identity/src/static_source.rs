//! The static inventory: a TOML file that names address ranges nobody else knows (office
//! networks, partners, a database on bare metal), reloaded while the process runs.
//!
//! ```toml
//! [[entry]]
//! cidr = "10.20.0.0/16"          # or a single address: "10.20.0.5" (= /32, /128)
//! name = "office-lan"            # required
//! kind = "static"                # optional: any IdentityKind symbol, default "static"
//! namespace = "corp"             # optional, like every field below
//! labels = { team = "it", site = "hq" }
//! zone = "eu-west-1a"
//! region = "eu-west-1"
//! account = "123456789012"
//! vpc = "vpc-0abc"
//! subnet = "subnet-0def"
//! instance_id = "i-0123"
//! node = "node-1"
//! container_id = "…"
//! pod_uid = "…"
//! workload = { kind = "Deployment", name = "web" }
//! from = 2026-01-01T00:00:00Z    # optional, RFC 3339 (TOML datetime or string), with an offset
//! to = "2026-07-01T00:00:00+02:00"
//! ```
//!
//! Times: an entry without `from` holds its range since forever (0); without `to`, until the
//! entry disappears from the file, and is then closed at the reload that saw it go. An entry with
//! `to` is closed at `to` (at the first check at or after it). An entry is keyed by
//! `(cidr, name, from)`: changing any other field closes the old version and opens the new one
//! at the reload time (so past flows keep the identity they had); an edit that sets `to` to a
//! time already past closes the entry at that `to`. A new entry opens at its
//! `from`, which may be in the past (the file is trusted about history) or the future.
//!
//! Reloading: every `interval` the file is read and its content hash compared with the last one
//! seen, so any edit is picked up (write files atomically — rename over — to avoid half-written
//! reads). A file that fails to read or parse leaves the previous entries in force, is counted
//! (`flowlog_identity_static_reload_errors_total`) and logged once with the file and line, and
//! is not retried until its content changes. A Watermark(now) follows every successful check; a
//! failed one sends none, because the edit we cannot read may hold changes we cannot report.
use std::{
    collections::{BTreeMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use flowlog_record::{Identity, IdentityKind, Workload};
use ipnet::IpNet;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use toml::{Spanned, value::Datetime};

use crate::{
    change::OwnershipChange,
    source::{BoxFuture, FailureLog, InventorySource, SourceError, check_every},
};

/// The source name in changes and watermarks.
pub const STATIC_SOURCE: &str = "static";

/// A static file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    #[error("reading static inventory {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or not the fields an entry has.
    #[error("static inventory {}:{line}", path.display())]
    Syntax {
        path: PathBuf,
        /// 1-based line the TOML parser points at (0 when it gave no position).
        line: usize,
        source: Box<toml::de::Error>,
    },
    /// An entry's value that cannot be used (an address, a time, a duplicate).
    #[error("static inventory {}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        /// 1-based line of the offending entry or field.
        line: usize,
        message: String,
    },
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    entry: Vec<Spanned<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    cidr: Spanned<String>,
    name: String,
    #[serde(default)]
    kind: IdentityKind,
    namespace: Option<String>,
    workload: Option<Workload>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    node: Option<String>,
    zone: Option<String>,
    region: Option<String>,
    account: Option<String>,
    vpc: Option<String>,
    subnet: Option<String>,
    instance_id: Option<String>,
    container_id: Option<String>,
    pod_uid: Option<String>,
    from: Option<Spanned<toml::Value>>,
    to: Option<Spanned<toml::Value>>,
}

/// What identifies an entry across reloads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct EntryKey {
    cidr: IpNet,
    name: String,
    from: u64,
}

impl EntryKey {
    /// The owner key in changes: unique per live entry, stable across reloads.
    fn owner(&self) -> String {
        if self.from == 0 {
            format!("static/{}", self.name)
        } else {
            format!("static/{}@{}", self.name, self.from)
        }
    }
}

/// An entry as parsed.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    identity: Arc<Identity>,
    to: Option<u64>,
}

/// An entry as applied: whether its interval is still open in the index.
#[derive(Debug, Clone)]
struct Applied {
    entry: Entry,
    open: bool,
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An RFC 3339 time (a TOML offset datetime, or a string in that form) as ns since the epoch.
fn time_ns(value: &toml::Value) -> Result<u64, String> {
    let parsed;
    let dt: &Datetime = match value {
        toml::Value::Datetime(dt) => dt,
        toml::Value::String(s) => {
            parsed = Datetime::from_str(s).map_err(|e| format!("{s:?} is not RFC 3339: {e}"))?;
            &parsed
        }
        other => {
            return Err(format!(
                "expected an RFC 3339 time, found {}",
                other.type_str()
            ));
        }
    };
    let (Some(date), Some(time), Some(offset)) = (dt.date, dt.time, dt.offset) else {
        return Err(format!(
            "{dt} needs a date, a time and an offset (e.g. 2026-01-01T00:00:00Z)"
        ));
    };
    let offset_minutes = match offset {
        toml::value::Offset::Z => 0,
        toml::value::Offset::Custom { minutes } => i64::from(minutes),
    };
    let secs = days_from_civil(
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    ) * 86_400
        + i64::from(time.hour) * 3_600
        + i64::from(time.minute) * 60
        + i64::from(time.second.unwrap_or(0))
        - offset_minutes * 60;
    let secs = u64::try_from(secs).map_err(|_| format!("{dt} is before 1970"))?;
    Ok(secs * 1_000_000_000 + u64::from(time.nanosecond.unwrap_or(0)))
}

/// Parses and validates the whole file; the first problem is an error with its line.
fn parse(path: &Path, text: &str) -> Result<BTreeMap<EntryKey, Entry>, StaticError> {
    let error = |offset: Option<usize>, message: String| StaticError::Parse {
        path: path.to_owned(),
        line: offset.map_or(0, |o| line_of(text, o)),
        message,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| StaticError::Syntax {
        path: path.to_owned(),
        line: e.span().map_or(0, |s| line_of(text, s.start)),
        source: Box::new(e),
    })?;
    let mut entries = BTreeMap::new();
    for spanned in raw.entry {
        let at = spanned.span().start;
        let e = spanned.into_inner();
        let cidr_at = e.cidr.span().start;
        let cidr = e.cidr.into_inner();
        let cidr = match (cidr.parse::<IpNet>(), cidr.parse::<IpAddr>()) {
            (Ok(net), _) => net.trunc(),
            (_, Ok(addr)) => IpNet::from(addr),
            _ => {
                return Err(error(
                    Some(cidr_at),
                    format!("cidr {cidr:?} is neither a CIDR nor an address"),
                ));
            }
        };
        if e.name.is_empty() {
            return Err(error(Some(at), "name is empty".into()));
        }
        let time = |v: Option<Spanned<toml::Value>>, field: &str| {
            v.map(|v| {
                time_ns(v.get_ref())
                    .map_err(|m| error(Some(v.span().start), format!("{field}: {m}")))
            })
            .transpose()
        };
        let from = time(e.from, "from")?.unwrap_or(0);
        let to = time(e.to, "to")?;
        if to.is_some_and(|to| to <= from) {
            return Err(error(
                Some(at),
                format!("entry {:?}: `to` is not after `from`", e.name),
            ));
        }
        let identity = Identity {
            kind: e.kind,
            name: e.name.clone(),
            namespace: e.namespace,
            workload: e.workload,
            labels: e.labels,
            node: e.node,
            zone: e.zone,
            region: e.region,
            account: e.account,
            vpc: e.vpc,
            subnet: e.subnet,
            instance_id: e.instance_id,
            container_id: e.container_id,
            pod_uid: e.pod_uid,
            source: STATIC_SOURCE.to_owned(),
        };
        let key = EntryKey {
            cidr,
            name: e.name,
            from,
        };
        let entry = Entry {
            identity: Arc::new(identity),
            to,
        };
        if entries.insert(key.clone(), entry).is_some() {
            return Err(error(
                Some(at),
                format!(
                    "a second entry {:?} for {} with the same `from`",
                    key.name, key.cidr
                ),
            ));
        }
    }
    Ok(entries)
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The static file, its entries as applied, and the reload state.
#[derive(Debug)]
pub struct StaticSource {
    path: PathBuf,
    interval: Duration,
    /// Entries as sent to the index.
    applied: BTreeMap<EntryKey, Applied>,
    /// Parsed at start-up, applied by the first check.
    initial: Option<BTreeMap<EntryKey, Entry>>,
    /// Hash of the content last parsed (good or bad): unchanged content is not parsed again.
    seen: Option<u64>,
    /// Whether the content last seen failed, so checks fail until it changes.
    seen_failed: bool,
    failures: FailureLog,
}

impl StaticSource {
    /// Reads and validates `path` now: a missing or invalid file is an error naming it (and the
    /// line). The entries are sent by the first check.
    pub fn open(path: impl Into<PathBuf>, interval: Duration) -> Result<Self, StaticError> {
        let path = path.into();
        let bytes = std::fs::read(&path).map_err(|source| StaticError::Read {
            path: path.clone(),
            source,
        })?;
        let entries = parse(&path, &String::from_utf8_lossy(&bytes))?;
        Ok(Self {
            path,
            interval,
            applied: BTreeMap::new(),
            initial: Some(entries),
            seen: Some(content_hash(&bytes)),
            seen_failed: false,
            failures: FailureLog::new(STATIC_SOURCE),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries in force (as last applied).
    pub fn entries(&self) -> usize {
        self.applied.len()
    }

    /// Checks that failed since the last good one.
    pub fn failures(&self) -> u64 {
        self.failures.failures()
    }

    /// One check at `now_ns`: re-reads the file if its content changed, and returns the changes
    /// to send (Opens and Closes for the difference, Closes for entries whose `to` has passed,
    /// then a Watermark(now) if the check succeeded). [`InventorySource::run`] calls it every
    /// `interval`; tests call it with chosen times.
    pub fn check(&mut self, now_ns: u64) -> Vec<OwnershipChange> {
        let mut changes = Vec::new();
        let loaded = match self.initial.take() {
            Some(entries) => Ok(Some(entries)),
            None => self.reload(),
        };
        let ok = match loaded {
            Ok(Some(entries)) => {
                self.diff(entries, now_ns, &mut changes);
                true
            }
            Ok(None) => !self.seen_failed,
            Err(e) => {
                self.failures.failed(&e);
                metrics::counter!(crate::metrics::STATIC_RELOAD_ERRORS).increment(1);
                false
            }
        };
        self.expire(now_ns, &mut changes);
        if ok {
            self.failures.succeeded();
            changes.push(OwnershipChange::Watermark {
                source: STATIC_SOURCE.to_owned(),
                at_ns: now_ns,
            });
        }
        changes
    }

    /// The file's entries if its content changed since the last look, `None` if not.
    fn reload(&mut self) -> Result<Option<BTreeMap<EntryKey, Entry>>, StaticError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(source) => {
                // A missing file is a change too: when it comes back, parse it again.
                self.seen = None;
                self.seen_failed = true;
                return Err(StaticError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let hash = content_hash(&bytes);
        if self.seen == Some(hash) {
            return Ok(None);
        }
        self.seen = Some(hash);
        let parsed = parse(&self.path, &String::from_utf8_lossy(&bytes));
        self.seen_failed = parsed.is_err();
        parsed.map(Some)
    }

    /// Changes that turn the applied entries into `new`, at `now`.
    fn diff(
        &mut self,
        mut new: BTreeMap<EntryKey, Entry>,
        now: u64,
        out: &mut Vec<OwnershipChange>,
    ) {
        // Entries whose `to` passed are closed at `to`, whatever the edit did to them.
        self.expire(now, out);
        let old = std::mem::take(&mut self.applied);
        for (key, applied) in old {
            match new.remove(&key) {
                None => {
                    if applied.open {
                        out.push(close(&key, now.max(key.from)));
                    }
                }
                Some(entry) if entry == applied.entry => {
                    self.applied.insert(key, applied);
                }
                Some(entry) => {
                    let start = now.max(key.from);
                    if applied.open {
                        // An edit that moved `to` into the past ends the entry then, not now.
                        let end = match entry.to {
                            Some(to) if to < start => to.max(key.from),
                            _ => start,
                        };
                        out.push(close(&key, end));
                    }
                    let open = entry.to.is_none_or(|to| to > start);
                    if open {
                        out.push(open_change(&key, &entry, start));
                    }
                    self.applied.insert(key, Applied { entry, open });
                }
            }
        }
        for (key, entry) in new {
            out.push(open_change(&key, &entry, key.from));
            self.applied.insert(key, Applied { entry, open: true });
        }
    }

    /// Closes, at their `to`, open entries whose `to` is at or before `now`.
    fn expire(&mut self, now: u64, out: &mut Vec<OwnershipChange>) {
        for (key, applied) in &mut self.applied {
            if let Some(to) = applied.entry.to
                && applied.open
                && to <= now
            {
                out.push(close(key, to));
                applied.open = false;
            }
        }
    }
}

fn open_change(key: &EntryKey, entry: &Entry, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Open {
        source: STATIC_SOURCE.to_owned(),
        owner: key.owner(),
        prefix: key.cidr,
        identity: Arc::clone(&entry.identity),
        at_ns,
    }
}

fn close(key: &EntryKey, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Close {
        source: STATIC_SOURCE.to_owned(),
        owner: key.owner(),
        prefix: key.cidr,
        at_ns,
    }
}

impl InventorySource for StaticSource {
    fn name(&self) -> &str {
        STATIC_SOURCE
    }

    fn run(
        mut self: Box<Self>,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // The file is small: reading it inline is cheaper than a blocking-pool hop.
            let interval = self.interval;
            check_every(interval, &changes, &shutdown, |now| self.check(now)).await;
            Ok(())
        })
    }
}
