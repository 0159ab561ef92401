//! Turns one watched kind's event stream into ownership intervals: it remembers, per object,
//! the claims it has opened (and not closed), and on each event sends only the difference —
//! Opens for new claims or changed identities, Closes for claims the object no longer makes or
//! for objects that are gone. A re-list (the watcher's `Init` … `InitDone` after 410 Gone or a
//! restart) is buffered and applied as one step at `InitDone`: Closes for every object that was
//! open and is not in the list first, then the listed objects' differences, all at that time.
//! So a re-list re-sends nothing for owners still open, loses no Close whose DELETED event fell
//! in the gap, and never opens a new owner of an address before the vanished one's Close.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use flowlog_identity::OwnershipChange;

use crate::claims::{Claim, KUBERNETES_SOURCE};

/// The open claims of one kind's objects, and a re-list in progress.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Per object key: the claims whose intervals are open (never empty).
    open: BTreeMap<String, Vec<Claim>>,
    /// During a re-list, the objects listed so far with their claims.
    relist: Option<Vec<(String, Vec<Claim>)>>,
}

fn open_change(claim: &Claim, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Open {
        source: KUBERNETES_SOURCE.to_owned(),
        owner: claim.owner.clone(),
        prefix: claim.prefix,
        identity: Arc::clone(&claim.identity),
        at_ns,
    }
}

fn close_change(claim: &Claim, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Close {
        source: KUBERNETES_SOURCE.to_owned(),
        owner: claim.owner.clone(),
        prefix: claim.prefix,
        at_ns,
    }
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// An object as it is now (ADDED, MODIFIED, or listed outside a re-list).
    pub fn apply(
        &mut self,
        key: String,
        claims: Vec<Claim>,
        at_ns: u64,
        out: &mut Vec<OwnershipChange>,
    ) {
        let old = self.open.remove(&key).unwrap_or_default();
        for gone in old.iter().filter(|o| {
            !claims
                .iter()
                .any(|c| c.owner == o.owner && c.prefix == o.prefix)
        }) {
            out.push(close_change(gone, at_ns));
        }
        let mut kept = Vec::with_capacity(claims.len());
        for claim in claims {
            match old
                .iter()
                .find(|o| o.owner == claim.owner && o.prefix == claim.prefix)
            {
                // Unchanged: nothing to send; keep the identity already shared with the index.
                Some(o) if *o.identity == *claim.identity => kept.push(o.clone()),
                // New, or the identity changed (relabelled): an Open, which the index turns
                // into a new tenure from now on while past flows keep the old identity.
                _ => {
                    out.push(open_change(&claim, at_ns));
                    kept.push(claim);
                }
            }
        }
        if !kept.is_empty() {
            self.open.insert(key, kept);
        }
    }

    /// An object deleted: its open claims close.
    pub fn delete(&mut self, key: &str, at_ns: u64, out: &mut Vec<OwnershipChange>) {
        if let Some(old) = self.open.remove(key) {
            out.extend(old.iter().map(|c| close_change(c, at_ns)));
        }
    }

    /// A (re-)list begins: objects are collected until [`Tracker::init_done`].
    pub fn init(&mut self) {
        self.relist = Some(Vec::new());
    }

    /// An object of the list in progress.
    pub fn init_apply(&mut self, key: String, claims: Vec<Claim>) {
        self.relist.get_or_insert_with(Vec::new).push((key, claims));
    }

    /// The list is complete: objects open before and not listed are gone (their DELETED events
    /// fell in the gap), so their claims close first; then each listed object is applied.
    pub fn init_done(&mut self, at_ns: u64, out: &mut Vec<OwnershipChange>) {
        let listed = self.relist.take().unwrap_or_default();
        let keys: BTreeSet<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
        let vanished: Vec<String> = self
            .open
            .keys()
            .filter(|k| !keys.contains(k.as_str()))
            .cloned()
            .collect();
        for key in vanished {
            self.delete(&key, at_ns, out);
        }
        // Claims that moved from one listed object to another close before they reopen.
        let mut opens = Vec::new();
        for (key, claims) in listed {
            self.apply(key, claims, at_ns, &mut opens);
        }
        let (closes, opens): (Vec<_>, Vec<_>) = opens
            .into_iter()
            .partition(|c| matches!(c, OwnershipChange::Close { .. }));
        out.extend(closes);
        out.extend(opens);
    }

    /// Whether a list is in progress (the view is incomplete until it is done).
    pub fn relisting(&self) -> bool {
        self.relist.is_some()
    }

    /// Claims currently open.
    pub fn open_claims(&self) -> usize {
        self.open.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use flowlog_record::{Identity, IdentityKind};

    use super::*;

    fn claim(owner: &str, ip: &str, name: &str) -> Claim {
        Claim {
            owner: owner.to_owned(),
            prefix: ip.parse::<std::net::IpAddr>().unwrap().into(),
            identity: Arc::new(Identity {
                kind: IdentityKind::Pod,
                name: name.to_owned(),
                source: KUBERNETES_SOURCE.to_owned(),
                ..Identity::default()
            }),
        }
    }

    fn summary(changes: &[OwnershipChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                OwnershipChange::Open {
                    owner,
                    identity,
                    at_ns,
                    ..
                } => format!("open {owner} {} @{at_ns}", identity.name),
                OwnershipChange::Close { owner, at_ns, .. } => format!("close {owner} @{at_ns}"),
                OwnershipChange::Watermark { at_ns, .. } => format!("watermark @{at_ns}"),
            })
            .collect()
    }

    #[test]
    fn modifications_send_only_differences() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.apply(
            "a".into(),
            vec![claim("pod/a/10.0.0.1", "10.0.0.1", "a")],
            1,
            &mut out,
        );
        t.apply(
            "a".into(),
            vec![claim("pod/a/10.0.0.1", "10.0.0.1", "a")],
            2,
            &mut out,
        );
        t.apply(
            "a".into(),
            vec![claim("pod/a/10.0.0.1", "10.0.0.1", "a2")],
            3,
            &mut out,
        );
        t.apply("a".into(), Vec::new(), 4, &mut out);
        t.delete("a", 5, &mut out);
        assert_eq!(
            summary(&out),
            [
                "open pod/a/10.0.0.1 a @1",
                "open pod/a/10.0.0.1 a2 @3",
                "close pod/a/10.0.0.1 @4",
            ]
        );
        assert_eq!(t.open_claims(), 0);
    }

    #[test]
    fn relist_closes_vanished_first_and_reopens_nothing() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.apply(
            "a".into(),
            vec![claim("pod/a/10.0.0.1", "10.0.0.1", "a")],
            1,
            &mut out,
        );
        t.apply(
            "b".into(),
            vec![claim("pod/b/10.0.0.2", "10.0.0.2", "b")],
            1,
            &mut out,
        );
        out.clear();
        t.init();
        assert!(t.relisting());
        // a vanished; c holds a's address now; b is unchanged.
        t.init_apply("c".into(), vec![claim("pod/c/10.0.0.1", "10.0.0.1", "c")]);
        t.init_apply("b".into(), vec![claim("pod/b/10.0.0.2", "10.0.0.2", "b")]);
        t.init_done(7, &mut out);
        assert!(!t.relisting());
        assert_eq!(
            summary(&out),
            ["close pod/a/10.0.0.1 @7", "open pod/c/10.0.0.1 c @7"]
        );
        assert_eq!(t.open_claims(), 2);
    }
}
