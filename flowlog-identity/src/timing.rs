//! How a source times what it reports, which decides which flows must wait for it.
//!
//! A flow newer than a source's watermark may still be changed by what the source reports next,
//! so the enricher holds it. How far that reaches depends on how the source dates its changes:
//! a watch dates an event at its arrival, so its next event may be dated at any time after its
//! watermark and every newer flow must wait ([`Timing::Continuous`]); a poller dates what a poll
//! sees at the poll's start, so until its next poll it can change nothing but the prefixes it
//! already holds ([`Timing::Polled`]) — a flow to any other address need not wait for it at all.
//! [`IdentityIndex::unsettled`](crate::IdentityIndex::unsettled) applies these rules per address.
use std::time::Duration;

/// How a source dates its changes: the promise that lets flows it cannot change go out without
/// waiting for its next report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Timing {
    /// A change may be dated at any time after the source's watermark (a watch event is dated
    /// when it arrives, and arrives late): every flow newer than the watermark waits for it.
    #[default]
    Continuous,
    /// The source reports in polls at least `period` apart, each followed by its watermark (the
    /// poll's start). It promises that its next report dates every change at that poll's start,
    /// at least `period` after its last watermark, **except** a prefix it holds that changed
    /// owner (a handover), whose new owner is dated from just after the last watermark, so that
    /// flows between the two polls are `ambiguous` between the two owners rather than given to
    /// the old one. So a flow newer than the watermark waits for it only if its address is in a
    /// prefix the source held after its watermark, or if the flow is newer than the next poll's
    /// start (`watermark + period`).
    Polled { period: Duration },
}

impl Timing {
    /// `period` in ns for [`Timing::Polled`], else 0.
    pub fn period_ns(self) -> u64 {
        match self {
            Timing::Continuous => 0,
            Timing::Polled { period } => u64::try_from(period.as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

/// A set of registered sources (by the index's source number), as the sources a flow waits for.
/// A bit set: a flow is checked against every source on the hot path, so no allocation. Sources
/// numbered 63 and above share the last bit (more than 63 sources is not a real configuration;
/// sharing only makes flows wait for all of them together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceSet(u64);

impl SourceSet {
    pub const EMPTY: SourceSet = SourceSet(0);

    fn bit(id: usize) -> u64 {
        1 << id.min(63)
    }

    pub fn insert(&mut self, id: usize) {
        self.0 |= Self::bit(id);
    }

    pub fn contains(self, id: usize) -> bool {
        self.0 & Self::bit(id) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, other: SourceSet) -> SourceSet {
        SourceSet(self.0 | other.0)
    }

    /// The sources in both sets.
    pub fn intersection(self, other: SourceSet) -> SourceSet {
        SourceSet(self.0 & other.0)
    }

    /// The sources of `self` not in `other`.
    pub fn without(self, other: SourceSet) -> SourceSet {
        SourceSet(self.0 & !other.0)
    }

    /// The source numbers in the set, ascending (63 stands for 63 and above).
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..64).filter(move |i| self.0 & (1 << i) != 0)
    }
}
