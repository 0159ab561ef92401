//! Who owned an address, when: the time-ranged identity index that the enricher joins flows
//! with, and the inventory sources that feed it.
//!
//! Addresses are reused (pods churn, ENIs move), so joining a flow with the *current* owner of an
//! address misattributes it. Every inventory source instead reports ownership as intervals: an
//! [`OwnershipChange::Open`] when an owner takes a prefix, a [`OwnershipChange::Close`] when it
//! releases it, and [`OwnershipChange::Watermark`]s saying up to when its view is complete. One
//! task ([`apply_changes`]) applies them to an [`IdentityIndex`]; the enricher looks up each end
//! of a flow at the flow's time and holds flows newer than [`IdentityIndex::caught_up_to`].
//!
//! # Semantics
//! - Intervals are half-open, `[from, to)`; an Open without a Close is `[from, ∞)`. A Close
//!   ends the open interval of the same `(source, owner, prefix)`. Prefixes are canonical: host
//!   bits are cleared and IPv4-mapped IPv6 prefixes (`::ffff:0:0/96` and longer) are IPv4.
//! - An address reused by a new owner one second after the old one left: a flow before the
//!   switch gets the old owner, a flow after it the new one, and one in the gap nobody.
//! - [`IdentityIndex::lookup`] answers at the most specific prefix length with an interval
//!   containing the time (a /32 pod address beats a /16 static range); if two or more *different*
//!   owners overlap there, the answer is ambiguous and names them all (sorted), never one of them.
//! - A change known only to within a span (a source that cannot tell when exactly an owner took
//!   or released a prefix, e.g. from a watch event that arrived late) is an Open dated at the
//!   span's end or a Close at its start, plus an [`OwnershipChange::Uncertain`] span in which
//!   the owner *may* have held the prefix. A lookup in a span names the owner as a candidate: it
//!   is ambiguous (every owner that held or may have held the prefix, sorted) — also when that
//!   owner is the only candidate (it or nobody) — unless the one owner that surely held the
//!   prefix is the only candidate. Spans are pruned like closed intervals. A Close dated before
//!   its Open (both changes fell in one span) leaves no certain tenure, only the spans.
//! - Odd input is handled, counted ([`ChangeCounts`] and `flowlog_identity_*_total`) and never
//!   panics: a duplicate Open of an open `(source, owner, prefix)` (a Kubernetes re-list after 410
//!   Gone re-sends everything) opens no second interval — it keeps the earlier start, or, if the
//!   identity changed, splits the tenure at the new Open's time; an Open re-sent for a tenure that
//!   already closed is ignored, and so is a Close re-sent for a tenure that already ended at that
//!   time (even if the owner holds the prefix again since); any other Close with no open interval
//!   is kept pending so that an Open arriving after it (out of order) makes a closed interval
//!   rather than an endless one; any other Close earlier than its Open's start drops the interval
//!   (it never held).
//! - Watermarks only move forward. [`IdentityIndex::caught_up_to`] is the minimum over the
//!   sources declared with [`IdentityIndex::register_source`]: `None` until each has sent one.
//! - [`IdentityIndex::prune`] forgets intervals that ended at or before a time, so memory stays
//!   bounded; lookups at or after that time are unaffected.
//!
//! # Use
//! ```
//! use std::sync::Arc;
//! use flowlog_identity::{IdentityIndex, OwnershipChange, apply_changes};
//! use flowlog_record::{Attribution, Identity, IdentityKind};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut index = IdentityIndex::new();
//! index.register_source("kubernetes");
//! let index = index.into_shared();
//! let (tx, rx) = tokio::sync::mpsc::channel(1024);
//! let applier = tokio::spawn(apply_changes(Arc::clone(&index), rx));
//! // Sources send into `tx` (see `spawn_source`); here, by hand:
//! let pod = Arc::new(Identity { kind: IdentityKind::Pod, name: "web-1".into(), ..Identity::default() });
//! let prefix = "10.1.2.3/32".parse().unwrap();
//! let (source, owner) = ("kubernetes".to_owned(), "pod/uid-1".to_owned());
//! tx.send(OwnershipChange::Open { source: source.clone(), owner: owner.clone(), prefix, identity: pod, at_ns: 100 }).await.unwrap();
//! tx.send(OwnershipChange::Close { source: source.clone(), owner, prefix, at_ns: 200 }).await.unwrap();
//! tx.send(OwnershipChange::Watermark { source, at_ns: 250 }).await.unwrap();
//! drop(tx);
//! applier.await.unwrap();
//!
//! // The enricher: hold flows newer than `caught_up_to`, look the rest up at their start time,
//! // taking the read lock once per batch.
//! let index = index.read();
//! assert_eq!(index.caught_up_to(), Some(250));
//! let addr = "10.1.2.3".parse().unwrap();
//! assert_eq!(index.lookup(addr, 150).identity.unwrap().name, "web-1");
//! assert_eq!(index.lookup(addr, 200).status, Attribution::Unknown);
//! # }
//! ```
//!
//! # Sources
//! [`InventorySource`] is what every source implements ([`StaticSource`] for a TOML file of
//! CIDRs, [`HostSource`] for this host's addresses; EC2 in the `flowlog-ec2` crate, Kubernetes
//! later). The local end of a flow is named from its process's cgroup by [`CgroupResolver`].
pub mod apply;
pub mod cgroup;
pub mod change;
pub mod host_source;
pub mod index;
pub mod metrics;
pub mod source;
pub mod static_source;
pub mod timing;

pub use apply::apply_changes;
pub use cgroup::{CgroupPath, CgroupResolver, cgroup_identity, cgroup2_mount, parse_cgroup_path};
pub use change::{OwnershipChange, now_ns};
pub use host_source::{HOST_SOURCE, HostError, HostSource, hostname};
pub use index::{ChangeCounts, Found, IdentityIndex, Presence, SharedIndex};
pub use source::{
    BoxFuture, FailureLog, InventorySource, SourceError, SourceRegistry, send_all, spawn_source,
};
pub use static_source::{STATIC_SOURCE, StaticError, StaticSource};
pub use timing::{SourceSet, Timing};
