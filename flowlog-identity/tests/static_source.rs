//! The static source on real files in a temporary directory: the changes of a first load, of an
//! edit, of `to` passing, of a broken edit (old entries kept, no watermark) and of its fix, each
//! with exact times; start-up errors that name the file and line; and the source running as a
//! task until shut down.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use flowlog_identity::{
    IdentityIndex, InventorySource, OwnershipChange, StaticError, StaticSource,
};
use flowlog_record::{Endpoint, Identity, IdentityKind};
use tokio_util::sync::CancellationToken;

const S: u64 = 1_000_000_000;
/// 2026-01-01T00:00:00Z, 2026-02-01T00:00:00Z, 2026-03-01T00:00:00Z, 2026-04-01T00:00:00Z.
const JAN: u64 = 1_767_225_600 * S;
const FEB: u64 = JAN + 31 * 86_400 * S;
const MAR: u64 = FEB + 28 * 86_400 * S;
const APR: u64 = MAR + 31 * 86_400 * S;

/// A directory of its own per test, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("flowlog-identity-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `name` the way an operator's tooling should: a new file renamed over the old.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const V1: &str = r#"# flowlog static inventory
[[entry]]
cidr = "10.20.0.0/16"
name = "office"
labels = { site = "hq" }

[[entry]]
cidr = "192.0.2.10"
name = "db"
kind = "instance"
region = "eu-west-1"
from = 2026-01-01T00:00:00Z

[[entry]]
cidr = "2001:db8::/32"
name = "partner"
from = "2026-01-01T01:00:00+01:00"
to = "2026-02-01T00:00:00Z"
"#;

/// V1 with `office` gone, `db` moved to another region, `lab` added (until April).
const V2: &str = r#"[[entry]]
cidr = "192.0.2.10"
name = "db"
kind = "instance"
region = "eu-west-2"
from = 2026-01-01T00:00:00Z

[[entry]]
cidr = "2001:db8::/32"
name = "partner"
from = "2026-01-01T01:00:00+01:00"
to = "2026-02-01T00:00:00Z"

[[entry]]
cidr = "10.30.0.0/16"
name = "lab"
to = 2026-04-01T00:00:00Z
"#;

fn office() -> Identity {
    Identity {
        kind: IdentityKind::Static,
        name: "office".into(),
        labels: [("site".to_owned(), "hq".to_owned())].into(),
        source: "static".into(),
        ..Identity::default()
    }
}

fn db(region: &str) -> Identity {
    Identity {
        kind: IdentityKind::Instance,
        name: "db".into(),
        region: Some(region.into()),
        source: "static".into(),
        ..Identity::default()
    }
}

fn named(name: &str) -> Identity {
    Identity {
        kind: IdentityKind::Static,
        name: name.into(),
        source: "static".into(),
        ..Identity::default()
    }
}

fn open(owner: &str, prefix: &str, identity: Identity, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Open {
        source: "static".into(),
        owner: owner.into(),
        prefix: prefix.parse().unwrap(),
        identity: Arc::new(identity),
        at_ns,
    }
}

fn close(owner: &str, prefix: &str, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Close {
        source: "static".into(),
        owner: owner.into(),
        prefix: prefix.parse().unwrap(),
        at_ns,
    }
}

fn watermark(at_ns: u64) -> OwnershipChange {
    OwnershipChange::Watermark {
        source: "static".into(),
        at_ns,
    }
}

/// Owner keys of entries with a `from`.
fn db_owner() -> String {
    format!("static/db@{JAN}")
}

fn partner_owner() -> String {
    format!("static/partner@{JAN}")
}

fn source(path: &Path) -> StaticSource {
    StaticSource::open(path, Duration::from_secs(5)).unwrap()
}

#[test]
fn a_first_load_opens_every_entry_at_its_from_and_closes_those_past_their_to() {
    let dir = TempDir::new("load");
    let path = dir.write("static.toml", V1);
    let mut src = source(&path);
    let changes = src.check(MAR);
    assert_eq!(
        changes,
        vec![
            open("static/office", "10.20.0.0/16", office(), 0),
            open(&db_owner(), "192.0.2.10/32", db("eu-west-1"), JAN),
            open(&partner_owner(), "2001:db8::/32", named("partner"), JAN),
            close(&partner_owner(), "2001:db8::/32", FEB),
            watermark(MAR),
        ]
    );
    assert_eq!(src.entries(), 3);
    // Through the index: who owned what, when.
    let mut index = IdentityIndex::new();
    changes.into_iter().for_each(|c| index.apply(c));
    let ip = |s: &str| s.parse().unwrap();
    assert_eq!(
        index.lookup(ip("10.20.3.4"), 5),
        Endpoint::exact(Arc::new(office()))
    );
    assert_eq!(index.lookup(ip("192.0.2.10"), JAN - 1), Endpoint::unknown());
    assert_eq!(
        index.lookup(ip("192.0.2.10"), JAN),
        Endpoint::exact(Arc::new(db("eu-west-1")))
    );
    assert_eq!(
        index.lookup(ip("2001:db8:5::1"), FEB - 1),
        Endpoint::exact(Arc::new(named("partner")))
    );
    assert_eq!(index.lookup(ip("2001:db8:5::1"), FEB), Endpoint::unknown());
    // Nothing changed: only a watermark.
    assert_eq!(src.check(MAR + S), vec![watermark(MAR + S)]);
}

#[test]
fn an_edit_becomes_exact_opens_and_closes_at_the_reload_time() {
    let dir = TempDir::new("edit");
    let path = dir.write("static.toml", V1);
    let mut src = source(&path);
    src.check(MAR);
    dir.write("static.toml", V2);
    let now = MAR + 100 * S;
    assert_eq!(
        src.check(now),
        vec![
            close("static/office", "10.20.0.0/16", now),
            close(&db_owner(), "192.0.2.10/32", now),
            open(&db_owner(), "192.0.2.10/32", db("eu-west-2"), now),
            open("static/lab", "10.30.0.0/16", named("lab"), 0),
            watermark(now),
        ]
    );
    assert_eq!(src.entries(), 3);
    // `lab`'s `to` passes: it is closed at its `to`, not at the check's time.
    assert_eq!(
        src.check(APR + 5 * S),
        vec![
            close("static/lab", "10.30.0.0/16", APR),
            watermark(APR + 5 * S)
        ]
    );
    assert_eq!(src.check(APR + 10 * S), vec![watermark(APR + 10 * S)]);
}

#[test]
fn an_edit_that_ends_an_entry_in_the_past_closes_it_then() {
    let dir = TempDir::new("end");
    let path = dir.write(
        "static.toml",
        "[[entry]]\ncidr = \"10.9.0.0/16\"\nname = \"old-dc\"\n",
    );
    let mut src = source(&path);
    assert_eq!(
        src.check(MAR),
        vec![
            open("static/old-dc", "10.9.0.0/16", named("old-dc"), 0),
            watermark(MAR)
        ]
    );
    dir.write(
        "static.toml",
        "[[entry]]\ncidr = \"10.9.0.0/16\"\nname = \"old-dc\"\nto = 2026-02-01T00:00:00Z\n",
    );
    assert_eq!(
        src.check(MAR + S),
        vec![
            close("static/old-dc", "10.9.0.0/16", FEB),
            watermark(MAR + S)
        ]
    );
    assert_eq!(src.entries(), 1);
    assert_eq!(src.check(MAR + 2 * S), vec![watermark(MAR + 2 * S)]);
}

#[test]
fn a_broken_edit_keeps_the_old_entries_until_it_is_fixed() {
    let dir = TempDir::new("broken");
    let path = dir.write("static.toml", V2);
    let mut src = source(&path);
    assert_eq!(src.check(MAR).len(), 5);
    let broken = V2.replace("cidr = \"10.30.0.0/16\"", "cidr = \"10.30.0.0/33\"");
    dir.write("static.toml", &broken);
    // No change and no watermark: the edit we cannot read may hold changes.
    assert_eq!(src.check(MAR + S), vec![]);
    assert_eq!(src.failures(), 1);
    assert_eq!(src.entries(), 3);
    // The same broken content is not parsed (or logged) again.
    assert_eq!(src.check(MAR + 2 * S), vec![]);
    assert_eq!(src.failures(), 1);
    // Fixed, with one entry more than the last good version: only that entry opens.
    let fixed = format!("{V2}\n[[entry]]\ncidr = \"10.50.0.0/16\"\nname = \"vpn\"\n");
    dir.write("static.toml", &fixed);
    assert_eq!(
        src.check(MAR + 3 * S),
        vec![
            open("static/vpn", "10.50.0.0/16", named("vpn"), 0),
            watermark(MAR + 3 * S)
        ]
    );
    assert_eq!(src.failures(), 0);
    assert_eq!(src.entries(), 4);
}

#[test]
fn a_file_removed_while_running_keeps_its_entries_and_is_read_again_when_back() {
    let dir = TempDir::new("removed");
    let path = dir.write("static.toml", V1);
    let mut src = source(&path);
    src.check(MAR);
    fs::remove_file(&path).unwrap();
    assert_eq!(src.check(MAR + S), vec![]);
    assert_eq!(src.check(MAR + 2 * S), vec![]);
    assert_eq!(src.failures(), 2);
    assert_eq!(src.entries(), 3);
    dir.write("static.toml", V1);
    assert_eq!(src.check(MAR + 3 * S), vec![watermark(MAR + 3 * S)]);
    assert_eq!(src.failures(), 0);
}

#[test]
fn start_up_errors_name_the_file_and_line() {
    let dir = TempDir::new("errors");
    let missing = dir.0.join("missing.toml");
    let err = StaticSource::open(&missing, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(&err, StaticError::Read { path, .. } if *path == missing));
    assert!(
        err.to_string()
            .starts_with(&format!("reading static inventory {}: ", missing.display())),
        "{err}"
    );

    let bad_cidr = V2.replace("cidr = \"10.30.0.0/16\"", "cidr = \"10.30.0.0/33\"");
    let path = dir.write("bad-cidr.toml", &bad_cidr);
    let err = StaticSource::open(&path, Duration::from_secs(5)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "static inventory {}:15: cidr \"10.30.0.0/33\" is neither a CIDR nor an address",
            path.display()
        )
    );

    let cases = [
        // A TOML syntax error (unterminated string) on line 3.
        ("[[entry]]\ncidr = \"10.0.0.0/8\"\nname = \"x\n", 3),
        // A misspelt field on line 4.
        (
            "[[entry]]\ncidr = \"10.0.0.0/8\"\nname = \"x\"\nregoin = \"eu\"\n",
            4,
        ),
        // A time without an offset on line 4.
        (
            "[[entry]]\ncidr = \"10.0.0.0/8\"\nname = \"x\"\nfrom = \"2026-01-01T00:00:00\"\n",
            4,
        ),
        // `to` not after `from`: the entry's line.
        (
            "\n[[entry]]\ncidr = \"10.0.0.0/8\"\nname = \"x\"\nfrom = 2026-01-02T00:00:00Z\nto = 2026-01-01T00:00:00Z\n",
            2,
        ),
        // The same entry twice: the second's line.
        (
            "[[entry]]\ncidr = \"10.0.0.0/8\"\nname = \"x\"\n[[entry]]\ncidr = \"10.0.0.0/8\"\nname = \"x\"\n",
            4,
        ),
    ];
    for (i, (text, line)) in cases.into_iter().enumerate() {
        let path = dir.write(&format!("case-{i}.toml"), text);
        match StaticSource::open(&path, Duration::from_secs(5)) {
            // The first two are the TOML parser's, with its error as the cause.
            Err(StaticError::Syntax {
                path: p, line: l, ..
            }) if i < 2 => {
                assert_eq!((p, l), (path.clone(), line), "case {i}");
            }
            Err(StaticError::Parse {
                path: p,
                line: l,
                message,
            }) if i >= 2 => {
                assert_eq!((p, l), (path.clone(), line), "case {i}: {message}");
            }
            other => panic!("case {i}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_source_runs_as_a_task_until_shut_down() {
    let dir = TempDir::new("run");
    let path = dir.write("static.toml", V1);
    let src: Box<dyn InventorySource> = Box::new(source(&path));
    assert_eq!(src.name(), "static");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(src.run(tx, shutdown.clone()));
    let mut first = Vec::new();
    for _ in 0..5 {
        first.push(rx.recv().await.unwrap());
    }
    assert_eq!(first[0], open("static/office", "10.20.0.0/16", office(), 0));
    assert_eq!(first[3], close(&partner_owner(), "2001:db8::/32", FEB));
    assert!(matches!(first[4], OwnershipChange::Watermark { .. }));
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
