//! Turns one watched kind's event stream into ownership intervals: it remembers, per object,
//! the claims it has opened (and not closed), and on each event sends only the difference —
//! Opens for new claims or changed identities, Closes for claims the object no longer makes or
//! for objects that are gone. A re-list (`Init` … `InitDone` after 410 Gone or a restart) is
//! buffered and applied as one step at `InitDone`: Closes for every object that was open and is
//! not in the list first, then the listed objects' differences, all at that time. So a re-list
//! re-sends nothing for owners still open, loses no Close whose DELETED event fell in the gap,
//! and never opens a new owner of an address before the vanished one's Close.
//!
//! Every change comes with a [`When`]: the span in which it happened. An Open is dated at the
//! span's end (held for sure from then) and a Close at its start (held for sure until then),
//! each with an `Uncertain` span over the rest, in which the owner is only a candidate.
//!
//! A terminating object (its `deletionTimestamp` set) still holds its addresses until it is
//! gone. But the network may already have given an address away: when another object claims an
//! address that a terminating one holds, the newcomer's span reaches back to when the
//! termination began — from then on either may have held it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use flowlog_identity::OwnershipChange;
use ipnet::IpNet;

use crate::{
    claims::{Claim, KUBERNETES_SOURCE},
    progress::When,
};

/// One object's open claims.
#[derive(Debug)]
struct Held {
    /// The claims whose intervals are open (never empty).
    claims: Vec<Claim>,
    /// Since when the object may have been releasing them (its termination began).
    terminating_since: Option<u64>,
}

/// The open claims of one kind's objects, and a re-list in progress.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Per object key.
    open: BTreeMap<String, Held>,
    /// Which objects hold each address (usually one).
    holders: HashMap<IpNet, BTreeSet<String>>,
    /// During a re-list, the objects listed so far with their claims and termination.
    relist: Option<Vec<(String, Vec<Claim>, bool)>>,
}

fn open_changes(claim: &Claim, when: When, since: Option<u64>, out: &mut Vec<OwnershipChange>) {
    let from = match (when.span().map(|(a, _)| a), since) {
        (Some(a), Some(s)) => Some(a.min(s)),
        (a, s) => a.or(s),
    };
    if let Some(from) = from.filter(|&f| f < when.by) {
        out.push(uncertain(claim, from, when.by));
    }
    out.push(OwnershipChange::Open {
        source: KUBERNETES_SOURCE.to_owned(),
        owner: claim.owner.clone(),
        prefix: claim.prefix,
        identity: Arc::clone(&claim.identity),
        at_ns: when.by,
    });
}

fn close_changes(claim: &Claim, when: When, out: &mut Vec<OwnershipChange>) {
    out.push(OwnershipChange::Close {
        source: KUBERNETES_SOURCE.to_owned(),
        owner: claim.owner.clone(),
        prefix: claim.prefix,
        at_ns: when.earliest(),
    });
    if let Some((from, to)) = when.span() {
        out.push(uncertain(claim, from, to));
    }
}

fn uncertain(claim: &Claim, from_ns: u64, to_ns: u64) -> OwnershipChange {
    OwnershipChange::Uncertain {
        source: KUBERNETES_SOURCE.to_owned(),
        owner: claim.owner.clone(),
        prefix: claim.prefix,
        identity: Arc::clone(&claim.identity),
        from_ns,
        to_ns,
    }
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Since when a terminating object other than `key` may have been giving `prefix` up.
    fn released_since(&self, prefix: &IpNet, key: &str) -> Option<u64> {
        self.holders
            .get(prefix)?
            .iter()
            .filter(|k| k.as_str() != key)
            .filter_map(|k| self.open.get(k)?.terminating_since)
            .min()
    }

    fn hold(&mut self, key: &str, claims: &[Claim]) {
        for c in claims {
            self.holders
                .entry(c.prefix)
                .or_default()
                .insert(key.to_owned());
        }
    }

    fn release(&mut self, key: &str, claims: &[Claim]) {
        for c in claims {
            if let Some(keys) = self.holders.get_mut(&c.prefix) {
                keys.remove(key);
                if keys.is_empty() {
                    self.holders.remove(&c.prefix);
                }
            }
        }
    }

    /// An object as it is now (ADDED, MODIFIED, or listed outside a re-list); `terminating`
    /// when its `deletionTimestamp` is set.
    pub fn apply(
        &mut self,
        key: String,
        claims: Vec<Claim>,
        terminating: bool,
        when: When,
        out: &mut Vec<OwnershipChange>,
    ) {
        let (old, since) = match self.open.remove(&key) {
            Some(held) => (held.claims, held.terminating_since),
            None => (Vec::new(), None),
        };
        self.release(&key, &old);
        for gone in old.iter().filter(|o| {
            !claims
                .iter()
                .any(|c| c.owner == o.owner && c.prefix == o.prefix)
        }) {
            close_changes(gone, when, out);
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
                    let since = self.released_since(&claim.prefix, &key);
                    open_changes(&claim, when, since, out);
                    kept.push(claim);
                }
            }
        }
        if !kept.is_empty() {
            self.hold(&key, &kept);
            let terminating_since = match terminating {
                true => since.or(Some(when.earliest())),
                false => None,
            };
            self.open.insert(
                key,
                Held {
                    claims: kept,
                    terminating_since,
                },
            );
        }
    }

    /// An object deleted: its open claims close.
    pub fn delete(&mut self, key: &str, when: When, out: &mut Vec<OwnershipChange>) {
        if let Some(held) = self.open.remove(key) {
            self.release(key, &held.claims);
            for c in &held.claims {
                close_changes(c, when, out);
            }
        }
    }

    /// A (re-)list begins: objects are collected until [`Tracker::init_done`].
    pub fn init(&mut self) {
        self.relist = Some(Vec::new());
    }

    /// An object of the list in progress.
    pub fn init_apply(&mut self, key: String, claims: Vec<Claim>, terminating: bool) {
        self.relist
            .get_or_insert_with(Vec::new)
            .push((key, claims, terminating));
    }

    /// The list is complete: objects open before and not listed are gone (their DELETED events
    /// fell in the gap), so their claims close first; then each listed object is applied.
    pub fn init_done(&mut self, when: When, out: &mut Vec<OwnershipChange>) {
        let listed = self.relist.take().unwrap_or_default();
        let keys: BTreeSet<&str> = listed.iter().map(|(k, _, _)| k.as_str()).collect();
        let vanished: Vec<String> = self
            .open
            .keys()
            .filter(|k| !keys.contains(k.as_str()))
            .cloned()
            .collect();
        for key in vanished {
            self.delete(&key, when, out);
        }
        // Claims that moved from one listed object to another close before they reopen.
        let mut changes = Vec::new();
        for (key, claims, terminating) in listed {
            self.apply(key, claims, terminating, when, &mut changes);
        }
        let (closes, opens): (Vec<_>, Vec<_>) = changes
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
        self.open.values().map(|h| h.claims.len()).sum()
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
                OwnershipChange::Uncertain {
                    owner,
                    from_ns,
                    to_ns,
                    ..
                } => format!("maybe {owner} @{from_ns}..{to_ns}"),
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
            false,
            When::at(1),
            &mut out,
        );
        t.apply(
            "a".into(),
            vec![claim("pod/a/10.0.0.1", "10.0.0.1", "a")],
            false,
            When::at(2),
            &mut out,
        );
        t.apply(
            "a".into(),
            vec![claim("pod/a/10.0.0.1", "10.0.0.1", "a2")],
            false,
            When::at(3),
            &mut out,
        );
        t.apply("a".into(), Vec::new(), false, When::at(4), &mut out);
        t.delete("a", When::at(5), &mut out);
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
            false,
            When::at(1),
            &mut out,
        );
        t.apply(
            "b".into(),
            vec![claim("pod/b/10.0.0.2", "10.0.0.2", "b")],
            false,
            When::at(1),
            &mut out,
        );
        out.clear();
        t.init();
        assert!(t.relisting());
        // a vanished; c holds a's address now; b is unchanged.
        t.init_apply(
            "c".into(),
            vec![claim("pod/c/10.0.0.1", "10.0.0.1", "c")],
            false,
        );
        t.init_apply(
            "b".into(),
            vec![claim("pod/b/10.0.0.2", "10.0.0.2", "b")],
            false,
        );
        t.init_done(When::at(7), &mut out);
        assert!(!t.relisting());
        assert_eq!(
            summary(&out),
            ["close pod/a/10.0.0.1 @7", "open pod/c/10.0.0.1 c @7"]
        );
        assert_eq!(t.open_claims(), 2);
    }

    fn late(after: u64, by: u64) -> When {
        When {
            after: Some(after),
            by,
        }
    }

    /// Changes known to within a span: the Open dated at its end with a span before it, the
    /// Close at its start with a span after it.
    #[test]
    fn late_changes_come_with_their_spans() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        let a = || vec![claim("pod/a/10.0.0.1", "10.0.0.1", "a")];
        t.apply("a".into(), a(), false, late(10, 15), &mut out);
        t.delete("a", late(40, 48), &mut out);
        assert_eq!(
            summary(&out),
            [
                "maybe pod/a/10.0.0.1 @10..15",
                "open pod/a/10.0.0.1 a @15",
                "close pod/a/10.0.0.1 @40",
                "maybe pod/a/10.0.0.1 @40..48",
            ]
        );
    }

    /// A terminating pod keeps its address (nothing is sent), but a pod given that address
    /// while it terminates may have had it since the termination began; once the old pod is
    /// gone, the next owner of the address is dated by its own event only.
    #[test]
    fn a_newcomer_on_a_terminating_pods_address_may_hold_it_since_the_termination() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        let a = || vec![claim("pod/a/10.0.0.1", "10.0.0.1", "a")];
        t.apply("a".into(), a(), false, When::at(10), &mut out);
        t.apply("a".into(), a(), true, late(20, 22), &mut out);
        t.apply("a".into(), a(), true, late(25, 26), &mut out);
        t.apply(
            "b".into(),
            vec![claim("pod/b/10.0.0.1", "10.0.0.1", "b")],
            false,
            late(30, 31),
            &mut out,
        );
        t.delete("a", late(40, 41), &mut out);
        t.delete("b", When::at(50), &mut out);
        t.apply(
            "c".into(),
            vec![claim("pod/c/10.0.0.1", "10.0.0.1", "c")],
            false,
            late(60, 61),
            &mut out,
        );
        assert_eq!(
            summary(&out),
            [
                "open pod/a/10.0.0.1 a @10",
                "maybe pod/b/10.0.0.1 @20..31",
                "open pod/b/10.0.0.1 b @31",
                "close pod/a/10.0.0.1 @40",
                "maybe pod/a/10.0.0.1 @40..41",
                "close pod/b/10.0.0.1 @50",
                "maybe pod/c/10.0.0.1 @60..61",
                "open pod/c/10.0.0.1 c @61",
            ]
        );
        assert_eq!(t.open_claims(), 1);
    }
}
