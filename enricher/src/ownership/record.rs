//! The topic's messages ([`OwnershipRecord`]) and the publisher's state that turns the sources'
//! changes into them ([`Tenures`]).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use flowlog_identity::{OwnershipChange, Timing};
use flowlog_record::Identity;
use ipnet::IpNet;
use metrics::counter;
use serde::{Deserialize, Serialize};

use crate::metrics as m;

/// One message of the topic.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OwnershipRecord {
    /// `owner` held `prefix` from `from_ns`, until `to_ns` (still holds it if null).
    Tenure {
        source: String,
        owner: String,
        prefix: IpNet,
        identity: Arc<Identity>,
        from_ns: u64,
        to_ns: Option<u64>,
    },
    /// `owner` may have held `prefix` during `[from_ns, to_ns)`: a change the source could
    /// date only that well ([`OwnershipChange::Uncertain`]). Expires like a closed tenure.
    Uncertain {
        source: String,
        owner: String,
        prefix: IpNet,
        identity: Arc<Identity>,
        from_ns: u64,
        to_ns: u64,
    },
    /// `source` had reported everything up to `at_ns`. `period_ns`: the source polls that
    /// often ([`Timing::Polled`]); absent for a source whose changes may be dated at any time
    /// after its watermark ([`Timing::Continuous`]; also what records from before this field
    /// mean).
    Watermark {
        source: String,
        at_ns: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        period_ns: Option<u64>,
    },
}

impl OwnershipRecord {
    /// The compaction key: a tenure's identity, or the source's watermark slot.
    pub fn key(&self) -> String {
        match self {
            OwnershipRecord::Tenure {
                source,
                owner,
                prefix,
                from_ns,
                ..
            } => tenure_key(source, owner, prefix, *from_ns),
            OwnershipRecord::Uncertain {
                source,
                owner,
                prefix,
                from_ns,
                to_ns,
                ..
            } => format!("uncertain/{source}/{owner}/{prefix}/{from_ns}/{to_ns}"),
            OwnershipRecord::Watermark { source, .. } => format!("watermark/{source}"),
        }
    }

    /// The changes this state means to an index (a closed tenure is its Open and its Close).
    pub fn changes(&self) -> Vec<OwnershipChange> {
        match self {
            OwnershipRecord::Tenure {
                source,
                owner,
                prefix,
                identity,
                from_ns,
                to_ns,
            } => {
                let mut out = vec![OwnershipChange::Open {
                    source: source.clone(),
                    owner: owner.clone(),
                    prefix: *prefix,
                    identity: Arc::clone(identity),
                    at_ns: *from_ns,
                }];
                if let Some(to) = to_ns {
                    out.push(OwnershipChange::Close {
                        source: source.clone(),
                        owner: owner.clone(),
                        prefix: *prefix,
                        at_ns: *to,
                    });
                }
                out
            }
            OwnershipRecord::Uncertain {
                source,
                owner,
                prefix,
                identity,
                from_ns,
                to_ns,
            } => vec![OwnershipChange::Uncertain {
                source: source.clone(),
                owner: owner.clone(),
                prefix: *prefix,
                identity: Arc::clone(identity),
                from_ns: *from_ns,
                to_ns: *to_ns,
            }],
            OwnershipRecord::Watermark { source, at_ns, .. } => {
                vec![OwnershipChange::Watermark {
                    source: source.clone(),
                    at_ns: *at_ns,
                }]
            }
        }
    }

    /// How the source of a watermark record dates its changes.
    pub fn timing(&self) -> Timing {
        match self {
            OwnershipRecord::Watermark {
                period_ns: Some(p), ..
            } => Timing::Polled {
                period: Duration::from_nanos(*p),
            },
            _ => Timing::Continuous,
        }
    }
}

fn tenure_key(source: &str, owner: &str, prefix: &IpNet, from_ns: u64) -> String {
    format!("tenure/{source}/{owner}/{prefix}/{from_ns}")
}

/// An open tenure the publisher knows of.
#[derive(Debug, Clone)]
struct Open {
    identity: Arc<Identity>,
    from_ns: u64,
    /// Confirmed by the source since this publisher started (an Open was received). Tenures
    /// replayed from the topic but never confirmed are closed at the source's first watermark:
    /// the owner went away while no publisher was running.
    confirmed: bool,
}

/// The publisher's state: open tenures per `(source, owner, prefix)`, and closed ones awaiting
/// expiry. Turns the sources' changes into the topic's records.
#[derive(Debug, Default)]
pub struct Tenures {
    open: HashMap<(String, String, IpNet), Open>,
    /// Closed tenures by close time → keys, for tombstones after the retention.
    closed: BTreeMap<u64, Vec<String>>,
    /// Sources that have sent a watermark since start.
    live: HashSet<String>,
    /// How each source dates its changes, published with its watermarks.
    timings: HashMap<String, Timing>,
}

impl Tenures {
    /// Rebuilds the state from the topic's records (a restart): what was open is open again,
    /// unconfirmed until its source says so.
    pub fn replay(&mut self, record: &OwnershipRecord) {
        if let OwnershipRecord::Uncertain { to_ns, .. } = record {
            self.closed.entry(*to_ns).or_default().push(record.key());
        }
        if let OwnershipRecord::Tenure {
            source,
            owner,
            prefix,
            identity,
            from_ns,
            to_ns,
        } = record
        {
            let key = (source.clone(), owner.clone(), *prefix);
            match to_ns {
                None => {
                    self.open.insert(
                        key,
                        Open {
                            identity: Arc::clone(identity),
                            from_ns: *from_ns,
                            confirmed: false,
                        },
                    );
                }
                Some(to) => {
                    self.open.remove(&key);
                    self.closed.entry(*to).or_default().push(record.key());
                }
            }
        }
    }

    /// Declares how `source` dates its changes (its [`InventorySource::timing`]), published
    /// with its watermarks; a source not declared is published as continuous.
    pub fn set_timing(&mut self, source: &str, timing: Timing) {
        self.timings.insert(source.to_owned(), timing);
    }

    /// Open tenures now.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// The records one change from a source makes.
    pub fn apply(&mut self, change: OwnershipChange) -> Vec<OwnershipRecord> {
        let mut out = Vec::new();
        match change {
            OwnershipChange::Open {
                source,
                owner,
                prefix,
                identity,
                at_ns,
            } => {
                let key = (source, owner, prefix);
                if let Some(open) = self.open.get_mut(&key) {
                    if open.identity == identity {
                        // A re-list re-sends what is open: the earlier start stands.
                        open.confirmed = true;
                        return out;
                    }
                    // The owner's identity changed: its tenure ends and a new one starts.
                    let old = self.open.remove(&key).expect("present");
                    out.push(self.closed_record(&key, old, at_ns));
                }
                out.push(OwnershipRecord::Tenure {
                    source: key.0.clone(),
                    owner: key.1.clone(),
                    prefix: key.2,
                    identity: Arc::clone(&identity),
                    from_ns: at_ns,
                    to_ns: None,
                });
                self.open.insert(
                    key,
                    Open {
                        identity,
                        from_ns: at_ns,
                        confirmed: true,
                    },
                );
            }
            OwnershipChange::Close {
                source,
                owner,
                prefix,
                at_ns,
            } => {
                let key = (source, owner, prefix);
                match self.open.remove(&key) {
                    Some(open) => out.push(self.closed_record(&key, open, at_ns)),
                    None => counter!(m::INVENTORY_UNMATCHED_CLOSES).increment(1),
                }
            }
            OwnershipChange::Uncertain {
                source,
                owner,
                prefix,
                identity,
                from_ns,
                to_ns,
            } => {
                let record = OwnershipRecord::Uncertain {
                    source,
                    owner,
                    prefix,
                    identity,
                    from_ns,
                    to_ns,
                };
                self.closed.entry(to_ns).or_default().push(record.key());
                out.push(record);
            }
            OwnershipChange::Watermark { source, at_ns } => {
                if self.live.insert(source.clone()) {
                    // The source's first complete view since start: what it did not confirm is
                    // gone, released at some time before now — closed here, at the earliest
                    // time we can vouch for.
                    let stale: Vec<_> = self
                        .open
                        .iter()
                        .filter(|((s, _, _), o)| *s == source && !o.confirmed)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in stale {
                        let open = self.open.remove(&key).expect("present");
                        out.push(self.closed_record(&key, open, at_ns));
                    }
                }
                let period_ns = match self.timings.get(&source) {
                    Some(t @ Timing::Polled { .. }) => Some(t.period_ns()),
                    _ => None,
                };
                out.push(OwnershipRecord::Watermark {
                    source,
                    at_ns,
                    period_ns,
                });
            }
        }
        out
    }

    fn closed_record(
        &mut self,
        (source, owner, prefix): &(String, String, IpNet),
        open: Open,
        at_ns: u64,
    ) -> OwnershipRecord {
        let record = OwnershipRecord::Tenure {
            source: source.clone(),
            owner: owner.clone(),
            prefix: *prefix,
            identity: open.identity,
            from_ns: open.from_ns,
            to_ns: Some(at_ns.max(open.from_ns)),
        };
        self.closed.entry(at_ns).or_default().push(record.key());
        record
    }

    /// Keys of tenures that closed before `before_ns`, forgotten here: publish tombstones for
    /// them so that compaction deletes them.
    pub fn expire(&mut self, before_ns: u64) -> Vec<String> {
        let keep = self.closed.split_off(&before_ns);
        std::mem::replace(&mut self.closed, keep)
            .into_values()
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::follow::relayed;

    fn identity(name: &str) -> Arc<Identity> {
        Arc::new(Identity {
            name: name.to_string(),
            source: "static".to_string(),
            ..Identity::default()
        })
    }

    fn open(owner: &str, name: &str, at: u64) -> OwnershipChange {
        OwnershipChange::Open {
            source: "k".into(),
            owner: owner.into(),
            prefix: "10.0.0.1/32".parse().unwrap(),
            identity: identity(name),
            at_ns: at,
        }
    }

    fn close(owner: &str, at: u64) -> OwnershipChange {
        OwnershipChange::Close {
            source: "k".into(),
            owner: owner.into(),
            prefix: "10.0.0.1/32".parse().unwrap(),
            at_ns: at,
        }
    }

    fn tenure(owner: &str, name: &str, from: u64, to: Option<u64>) -> OwnershipRecord {
        OwnershipRecord::Tenure {
            source: "k".into(),
            owner: owner.into(),
            prefix: "10.0.0.1/32".parse().unwrap(),
            identity: identity(name),
            from_ns: from,
            to_ns: to,
        }
    }

    #[test]
    fn tenures_open_close_and_relists() {
        let mut t = Tenures::default();
        assert_eq!(
            t.apply(open("a", "A", 10)),
            vec![tenure("a", "A", 10, None)]
        );
        // A re-list re-sends the Open: nothing new.
        assert_eq!(t.apply(open("a", "A", 15)), vec![]);
        // The identity changed: the tenure ends, a new one starts.
        assert_eq!(
            t.apply(open("a", "A2", 20)),
            vec![tenure("a", "A", 10, Some(20)), tenure("a", "A2", 20, None)]
        );
        assert_eq!(
            t.apply(close("a", 30)),
            vec![tenure("a", "A2", 20, Some(30))]
        );
        assert_eq!(t.apply(close("a", 31)), vec![], "unmatched close");
        assert_eq!(
            t.expire(25),
            vec![tenure("a", "A", 10, None).key()],
            "closed at 20 < 25"
        );
        assert_eq!(t.expire(100), vec![tenure("a", "A2", 20, None).key()]);
    }

    /// A span in which an owner may have held a prefix is one record of its own, expanded back
    /// to the same change, replayed and expired like a closed tenure.
    #[test]
    fn uncertain_spans_are_records_that_expire() {
        let change = OwnershipChange::Uncertain {
            source: "k".into(),
            owner: "a".into(),
            prefix: "10.0.0.1/32".parse().unwrap(),
            identity: identity("A"),
            from_ns: 10,
            to_ns: 40,
        };
        let mut t = Tenures::default();
        let records = t.apply(change.clone());
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].key(), "uncertain/k/a/10.0.0.1/32/10/40");
        let json = serde_json::to_string(&records[0]).unwrap();
        let back: OwnershipRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.changes(), vec![change]);
        assert_eq!(t.open(), 0, "a span opens no tenure");
        assert_eq!(t.expire(40), Vec::<String>::new(), "not before its end");
        assert_eq!(t.expire(41), vec![records[0].key()]);
        let mut replayed = Tenures::default();
        replayed.replay(&back);
        assert_eq!(replayed.expire(41), vec![records[0].key()]);
    }

    #[test]
    fn a_restart_closes_what_the_source_no_longer_confirms() {
        let mut t = Tenures::default();
        t.replay(&tenure("gone", "G", 5, None));
        t.replay(&tenure("kept", "K", 6, None));
        t.replay(&tenure("old", "O", 1, Some(2)));
        assert_eq!(t.open(), 2);
        assert_eq!(t.apply(open("kept", "K", 50)), vec![]);
        let w = OwnershipChange::Watermark {
            source: "k".into(),
            at_ns: 60,
        };
        assert_eq!(
            t.apply(w.clone()),
            vec![
                tenure("gone", "G", 5, Some(60)),
                OwnershipRecord::Watermark {
                    source: "k".into(),
                    at_ns: 60,
                    period_ns: None,
                }
            ]
        );
        assert_eq!(t.open(), 1);
        // Later watermarks close nothing.
        t.replay(&tenure("late", "L", 7, None));
        assert_eq!(t.apply(w).len(), 1);
    }

    /// A polled source's watermarks carry its period, which a follower registers; records
    /// written before the field existed read as a continuous source.
    #[test]
    fn watermarks_carry_the_timing_of_their_source() {
        let mut t = Tenures::default();
        t.set_timing(
            "ec2",
            Timing::Polled {
                period: Duration::from_secs(30),
            },
        );
        t.set_timing("k", Timing::Continuous);
        let w = |source: &str| OwnershipChange::Watermark {
            source: source.into(),
            at_ns: 7,
        };
        let records: Vec<OwnershipRecord> = ["ec2", "k", "undeclared"]
            .into_iter()
            .flat_map(|s| t.apply(w(s)))
            .collect();
        let json: Vec<String> = records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        assert_eq!(
            json,
            [
                r#"{"type":"watermark","source":"ec2","at_ns":7,"period_ns":30000000000}"#,
                r#"{"type":"watermark","source":"k","at_ns":7}"#,
                r#"{"type":"watermark","source":"undeclared","at_ns":7}"#,
            ]
        );
        let read: OwnershipRecord = serde_json::from_str(&json[0]).unwrap();
        assert_eq!(
            read.timing(),
            Timing::Polled {
                period: Duration::from_secs(30)
            }
        );
        let old: OwnershipRecord =
            serde_json::from_str(r#"{"type":"watermark","source":"k","at_ns":7}"#).unwrap();
        assert_eq!(old.timing(), Timing::Continuous);
        assert_eq!(
            relayed(w("ec2")),
            OwnershipChange::Watermark {
                source: "ownership/ec2".into(),
                at_ns: 7
            }
        );
    }

    #[test]
    fn records_round_trip_as_json_and_expand_to_changes() {
        let r = tenure("a", "A", 10, Some(20));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<OwnershipRecord>(&json).unwrap(), r);
        assert_eq!(r.changes(), vec![open("a", "A", 10), close("a", 20)]);
        assert_eq!(r.key(), "tenure/k/a/10.0.0.1/32/10");
    }
}
