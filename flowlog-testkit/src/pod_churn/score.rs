//! Scoring: each flow's remote end as a lookup answered it, against the pod that truly held the
//! address when the flow started.
use std::collections::BTreeMap;

use flowlog_record::{Attribution, Endpoint};

use super::Placement;

/// What a lookup said about a flow's remote address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Exactly one owner (its pod name).
    Owner(String),
    /// More than one candidate: flowlog says so rather than pick one.
    Ambiguous,
    /// No owner known.
    Unknown,
}

impl Answer {
    /// What an enriched flow's end says.
    pub fn of(end: &Endpoint) -> Self {
        match (end.status, &end.identity) {
            (Attribution::Exact, Some(identity)) => Answer::Owner(identity.name.clone()),
            (Attribution::Ambiguous, _) => Answer::Ambiguous,
            _ => Answer::Unknown,
        }
    }

    /// What a latest-owner lookup that found `owner` says.
    pub fn latest(owner: Option<&String>) -> Self {
        owner.map_or(Answer::Unknown, |o| Answer::Owner(o.clone()))
    }

    /// The owner that held the address (`truth`), or `Unknown` for an address nobody held.
    pub fn is_right(&self, truth: Option<&str>) -> bool {
        match (truth, self) {
            (Some(t), Answer::Owner(got)) => got == t,
            (None, Answer::Unknown) => true,
            _ => false,
        }
    }
}

/// Counts of one lookup's answers against the truth.
#[derive(Debug, Default, Clone, Copy)]
pub struct Score {
    pub flows: u64,
    /// The true owner, or `Unknown` for an address nobody held.
    pub correct: u64,
    /// Another pod than the one that held the address, or a pod for an address nobody held.
    pub misattributed: u64,
    pub ambiguous: u64,
    /// `Unknown` for an address that a pod did hold.
    pub unknown: u64,
    /// Flows whose address had an owner at their start (those that can come out `unknown`).
    pub owned: u64,
    /// `Ambiguous` for a flow whose address had an owner: a connect its peer answered (the
    /// rest of `ambiguous` are connects into a gap, which nobody answered).
    pub ambiguous_owned: u64,
}

impl Score {
    pub fn add(&mut self, truth: Option<&str>, answer: &Answer) {
        self.flows += 1;
        self.owned += u64::from(truth.is_some());
        if answer.is_right(truth) {
            self.correct += 1;
            return;
        }
        match answer {
            Answer::Owner(_) => self.misattributed += 1,
            Answer::Ambiguous => {
                self.ambiguous += 1;
                self.ambiguous_owned += u64::from(truth.is_some());
            }
            // Right for an address nobody held, so here the address had an owner.
            Answer::Unknown => self.unknown += 1,
        }
    }

    fn merge(&mut self, other: &Score) {
        self.flows += other.flows;
        self.correct += other.correct;
        self.misattributed += other.misattributed;
        self.ambiguous += other.ambiguous;
        self.unknown += other.unknown;
        self.owned += other.owned;
        self.ambiguous_owned += other.ambiguous_owned;
    }
}

/// flowlog's and the latest-owner lookup's scores, per placement.
#[derive(Debug, Default)]
pub struct Tally {
    pub by_placement: BTreeMap<Placement, [Score; 2]>,
}

/// Index of flowlog's score in a `[Score; 2]`.
pub const FLOWLOG: usize = 0;
/// Index of the latest-owner lookup's score.
pub const LATEST: usize = 1;

impl Tally {
    pub fn add(
        &mut self,
        placement: Placement,
        truth: Option<&str>,
        flowlog: &Answer,
        latest: &Answer,
    ) {
        let scores = self.by_placement.entry(placement).or_default();
        scores[FLOWLOG].add(truth, flowlog);
        scores[LATEST].add(truth, latest);
    }

    pub fn total(&self, which: usize) -> Score {
        let mut total = Score::default();
        for scores in self.by_placement.values() {
            total.merge(&scores[which]);
        }
        total
    }

    /// Flows whose address had an owner at their start (those that can come out `unknown`).
    pub fn owned_flows(&self) -> u64 {
        self.total(FLOWLOG).owned
    }
}

/// `n (p%)` of `of`.
pub fn share(n: u64, of: u64) -> String {
    if of == 0 {
        return n.to_string();
    }
    format!("{n} ({:.3}%)", n as f64 * 100.0 / of as f64)
}

/// The q-quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}
