//! How far one watched kind's stream is known to be complete, and when a change it carries
//! happened — from consistent reads, not from the wall clock.
//!
//! A watch event says *what* changed and its `resourceVersion`, not *when*: it may reach us late
//! (an API server under load), so its arrival only bounds the change from above. What bounds it
//! from both sides is a **probe**: a consistent LIST with `limit=1`, sent at a known time, whose
//! answer carries the collection's current `resourceVersion` R. The read happened between the
//! request and the answer, so every change with a version ≤ R was made before the answer came,
//! and every change with a later version after the request went out. Hence:
//! - the kind's stream is **complete up to** the send time of the latest probe whose version its
//!   watch has delivered (an event or bookmark at or past R; a list at R counts too, from the
//!   time its first page was asked for): the source's watermark is the oldest of these;
//! - a change delivered with version v arriving at time a happened **after** the send time of
//!   the latest probe answered with a version < v (or after the kind's complete-to time: the
//!   stream delivers in version order), and **by** the earlier of a and the answer time of the
//!   first probe answered with a version ≥ v. See [`When`].
//!
//! Versions are compared as integers: Kubernetes calls them opaque, but every kube-apiserver
//! writes etcd's revision there, a number that grows with every write. A version that does not
//! parse as one ([`Version::Opaque`]) is compared for equality only: its kind is then complete up
//! to a probe only when the watch has delivered exactly the probe's version, and its changes are
//! dated from the complete-to time to their arrival — wider spans, never a guess. Probes are
//! per kind, so versions of different kinds are never compared.
use std::collections::VecDeque;

/// A `resourceVersion` as the API server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// etcd's revision, as every kube-apiserver writes it.
    Number(u64),
    /// Anything else (an API server that does not use etcd revisions): only equality is known.
    Opaque(String),
}

impl Version {
    pub fn parse(text: &str) -> Self {
        match text.parse() {
            Ok(n) => Version::Number(n),
            Err(_) => Version::Opaque(text.to_owned()),
        }
    }

    /// Whether a stream at `self` has delivered everything up to `other`.
    pub fn reaches(&self, other: &Version) -> bool {
        match (self, other) {
            (Version::Number(a), Version::Number(b)) => a >= b,
            (a, b) => a == b,
        }
    }

    /// Whether `self` is known to be older than `other`.
    pub fn before(&self, other: &Version) -> bool {
        matches!((self, other), (Version::Number(a), Version::Number(b)) if a < b)
    }
}

/// One consistent read of a kind: sent at `sent_ns`, answered at `answered_ns` with the
/// collection's version then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub sent_ns: u64,
    pub answered_ns: u64,
    pub version: Version,
}

/// When a change happened: at or before `by`, and after `after` if that is known. `after:
/// None` is a change of a kind's first list (an object that held its address since before the
/// source started): it is dated `by`, and nothing is claimed before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct When {
    pub after: Option<u64>,
    pub by: u64,
}

impl When {
    /// Known to the nanosecond (tests, and sources that know).
    pub fn at(at_ns: u64) -> Self {
        Self {
            after: Some(at_ns),
            by: at_ns,
        }
    }

    /// The span in which the change may have happened, if it is not a single time.
    pub fn span(&self) -> Option<(u64, u64)> {
        self.after.filter(|&a| a < self.by).map(|a| (a, self.by))
    }

    /// The earliest time the change may have happened.
    pub fn earliest(&self) -> u64 {
        self.after.map_or(self.by, |a| a.min(self.by))
    }
}

/// Probes awaiting the stream at most (a watch that never catches up must not grow memory): the
/// oldest are dropped, which only makes spans wider.
const PENDING: usize = 4096;

/// One kind's progress: what its stream has delivered, and the probes it has not reached yet.
#[derive(Debug, Default)]
pub struct Progress {
    /// The version up to which the stream has delivered everything (its last event, bookmark,
    /// or list).
    delivered: Option<Version>,
    /// Answered probes the stream has not reached, oldest first.
    pending: VecDeque<Probe>,
    /// The stream has delivered every change made before this time.
    complete_to: Option<u64>,
}

impl Progress {
    /// The stream has delivered every change made before this time (None until its first list).
    pub fn complete_to(&self) -> Option<u64> {
        self.complete_to
    }

    /// The version the stream has delivered everything up to.
    pub fn delivered(&self) -> Option<&Version> {
        self.delivered.as_ref()
    }

    /// A probe was answered.
    pub fn probed(&mut self, probe: Probe) {
        if self.pending.len() == PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(probe);
        self.advance();
    }

    /// The watch delivered an event or a bookmark at `version` (take [`Progress::when`] of an
    /// event first).
    pub fn deliver(&mut self, version: Version) {
        self.delivered = Some(version);
        self.advance();
    }

    /// A (re-)list at `version`, whose first page was asked for at `sent_ns`: it holds every
    /// change made before then.
    pub fn listed(&mut self, version: Version, sent_ns: u64) {
        self.complete_to = Some(self.complete_to.map_or(sent_ns, |c| c.max(sent_ns)));
        self.deliver(version);
    }

    /// Every probe the stream has reached moves `complete_to` to its send time.
    fn advance(&mut self) {
        let Some(delivered) = &self.delivered else {
            return;
        };
        // Probes are answered in the order they were sent (one at a time per kind), so the
        // reached ones are a prefix — but an opaque version can be reached only by equality:
        // look at all of them.
        let mut reached = None;
        for (i, probe) in self.pending.iter().enumerate() {
            if delivered.reaches(&probe.version) {
                reached = Some(i);
            }
        }
        if let Some(last) = reached {
            for probe in self.pending.drain(..=last) {
                self.complete_to = Some(
                    self.complete_to
                        .map_or(probe.sent_ns, |c| c.max(probe.sent_ns)),
                );
            }
        }
    }

    /// When changes with versions from `first` (exclusive of everything delivered so far; None:
    /// anything after it) to `last`, delivered at `arrived_ns`, happened.
    pub fn when(&self, first: Option<&Version>, last: &Version, arrived_ns: u64) -> When {
        let mut after = self.complete_to;
        if let Some(first) = first {
            for probe in self.pending.iter().filter(|p| p.version.before(first)) {
                after = Some(after.map_or(probe.sent_ns, |a| a.max(probe.sent_ns)));
            }
        }
        let by = self
            .pending
            .iter()
            .filter(|p| p.version.reaches(last))
            .map(|p| p.answered_ns)
            .fold(arrived_ns, u64::min);
        When { after, by }
    }

    /// When the change an event at `version`, arriving at `arrived_ns`, carries happened.
    pub fn when_event(&self, version: &Version, arrived_ns: u64) -> When {
        self.when(Some(version), version, arrived_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(sent_ns: u64, answered_ns: u64, version: u64) -> Probe {
        Probe {
            sent_ns,
            answered_ns,
            version: Version::Number(version),
        }
    }

    /// A late event: its change is after the last probe that did not include it, and by the
    /// answer of the first that did — long before it arrived; the stream is complete up to the
    /// send time of the last probe it has reached.
    #[test]
    fn probes_bound_a_late_change_and_the_stream() {
        let mut p = Progress::default();
        p.listed(Version::Number(10), 100);
        assert_eq!(p.complete_to(), Some(100));
        p.probed(probe(200, 201, 10));
        assert_eq!(p.complete_to(), Some(200), "nothing new since the list");
        p.probed(probe(300, 302, 12));
        p.probed(probe(400, 401, 15));
        // Version 14 arrives at 900: made after 300 (version 12 did not have it), by 401.
        let v = Version::Number(14);
        assert_eq!(
            p.when_event(&v, 900),
            When {
                after: Some(300),
                by: 401
            }
        );
        p.deliver(v);
        assert_eq!(
            p.complete_to(),
            Some(300),
            "probe 400 (version 15) is not reached"
        );
        p.deliver(Version::Number(15));
        assert_eq!(p.complete_to(), Some(400));
        // An event no probe has seen: after the complete-to time, by its arrival.
        assert_eq!(
            p.when_event(&Version::Number(16), 950),
            When {
                after: Some(400),
                by: 950
            }
        );
        // A re-list after a gap: anything after what was delivered, by the list's version.
        p.probed(probe(500, 503, 20));
        assert_eq!(
            p.when(None, &Version::Number(21), 990),
            When {
                after: Some(400),
                by: 990
            }
        );
        assert_eq!(
            p.when(None, &Version::Number(19), 990),
            When {
                after: Some(400),
                by: 503
            }
        );
    }

    /// Opaque versions: reached only by equality, and events dated from the complete-to time.
    #[test]
    fn opaque_versions_are_compared_for_equality_only() {
        let mut p = Progress::default();
        p.listed(Version::parse("a1"), 100);
        p.probed(Probe {
            sent_ns: 200,
            answered_ns: 201,
            version: Version::parse("b7"),
        });
        let v = Version::parse("b6");
        assert_eq!(
            p.when_event(&v, 500),
            When {
                after: Some(100),
                by: 500
            }
        );
        p.deliver(v);
        assert_eq!(p.complete_to(), Some(100), "b6 is not known to reach b7");
        p.deliver(Version::parse("b7"));
        assert_eq!(p.complete_to(), Some(200));
    }
}
