//! What a binary's `/healthz` and `/readyz` answer, kept apart from the HTTP listener that
//! serves them ([`crate::telemetry`]) so that the work loops only touch cheap atomics and a
//! short lock.
//!
//! - **Alive** (`/healthz`): the main loop beat ([`Health::beat`]) within the stall limit. A
//!   process whose loop is stuck (a deadlock, a blocked runtime) stops beating and its
//!   orchestrator restarts it; a process that is merely waiting (a broker outage, a slow
//!   store) keeps beating, because restarting it would not help.
//! - **Ready** (`/readyz`): every named check passes. A check is either a condition the code
//!   sets ([`Health::set_ready`], [`Health::set_not_ready`]) or a freshness check that fails
//!   when it was not [`Health::touch`]ed within its limit ("the ring buffer was drained in the
//!   last 10 s"). A check that was declared ([`Health::expect`], [`Health::expect_fresh`]) but
//!   never satisfied is not ready, so a process is not ready until it has proved it.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The liveness and readiness of one process. Cheap to clone; every clone is the same state.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Origin of the millisecond timestamps below (monotonic).
    epoch: Instant,
    /// `/healthz` fails when the last beat is older than this.
    stall_after: Duration,
    /// Milliseconds since `epoch` of the last beat, plus one (0: never beat).
    last_beat_ms: AtomicU64,
    checks: Mutex<BTreeMap<&'static str, Check>>,
}

/// One readiness check.
#[derive(Debug, Clone)]
enum Check {
    /// Set by the code: `Ok` when ready, else why not.
    Condition(Result<(), String>),
    /// Ready while the last touch is younger than `max_age`.
    Fresh {
        max_age: Duration,
        /// Milliseconds since `epoch` of the last touch, if any.
        last_ms: Option<u64>,
    },
}

/// Why a probe fails: the failing checks, one line each (the body of the 503 answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady(pub Vec<String>);

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl Health {
    /// A process that is alive while its loop beats at least every `stall_after`. It beats
    /// once now, so it is alive while it starts; it has no readiness checks yet.
    pub fn new(stall_after: Duration) -> Self {
        let health = Self {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                stall_after,
                last_beat_ms: AtomicU64::new(0),
                checks: Mutex::new(BTreeMap::new()),
            }),
        };
        health.beat();
        health
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// The main loop made progress (call it at least once per `stall_after`, also while idle).
    pub fn beat(&self) {
        self.inner
            .last_beat_ms
            .store(self.now_ms() + 1, Ordering::Relaxed);
    }

    /// Declares a condition that is not ready until [`Health::set_ready`] says so.
    pub fn expect(&self, check: &'static str, why_not_yet: impl Into<String>) {
        self.set(check, Check::Condition(Err(why_not_yet.into())));
    }

    /// The condition `check` holds.
    pub fn set_ready(&self, check: &'static str) {
        self.set(check, Check::Condition(Ok(())));
    }

    /// The condition `check` does not hold, because `why`.
    pub fn set_not_ready(&self, check: &'static str, why: impl Into<String>) {
        self.set(check, Check::Condition(Err(why.into())));
    }

    /// Declares a freshness check: ready while [`Health::touch`] was called within `max_age`
    /// (not ready until the first touch).
    pub fn expect_fresh(&self, check: &'static str, max_age: Duration) {
        self.set(
            check,
            Check::Fresh {
                max_age,
                last_ms: None,
            },
        );
    }

    /// The freshness check `check` happened now (no effect on an undeclared check).
    pub fn touch(&self, check: &'static str) {
        let now = self.now_ms();
        let mut checks = self.inner.checks.lock().expect("health checks poisoned");
        if let Some(Check::Fresh { last_ms, .. }) = checks.get_mut(check) {
            *last_ms = Some(now);
        }
    }

    /// Removes a check (a part of the process that stopped being required).
    pub fn forget(&self, check: &'static str) {
        self.inner
            .checks
            .lock()
            .expect("health checks poisoned")
            .remove(check);
    }

    fn set(&self, check: &'static str, state: Check) {
        self.inner
            .checks
            .lock()
            .expect("health checks poisoned")
            .insert(check, state);
    }

    /// `/healthz`: alive unless the loop stopped beating.
    pub fn alive(&self) -> Result<(), NotReady> {
        let last = self
            .inner
            .last_beat_ms
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        let age = Duration::from_millis(self.now_ms().saturating_sub(last));
        if age > self.inner.stall_after {
            return Err(NotReady(vec![format!(
                "main loop: no progress for {:.1} s (limit {:.1} s)",
                age.as_secs_f64(),
                self.inner.stall_after.as_secs_f64()
            )]));
        }
        Ok(())
    }

    /// `/readyz`: alive and every check passes; otherwise every reason why not, in name order.
    pub fn ready(&self) -> Result<(), NotReady> {
        let mut failing = match self.alive() {
            Ok(()) => Vec::new(),
            Err(NotReady(reasons)) => reasons,
        };
        let now = self.now_ms();
        let checks = self.inner.checks.lock().expect("health checks poisoned");
        for (name, check) in checks.iter() {
            match check {
                Check::Condition(Ok(())) => {}
                Check::Condition(Err(why)) => failing.push(format!("{name}: {why}")),
                Check::Fresh {
                    max_age,
                    last_ms: None,
                } => failing.push(format!(
                    "{name}: not yet (needed at least every {:.1} s)",
                    max_age.as_secs_f64()
                )),
                Check::Fresh {
                    max_age,
                    last_ms: Some(last),
                } => {
                    let age = Duration::from_millis(now.saturating_sub(*last));
                    if age > *max_age {
                        failing.push(format!(
                            "{name}: last {:.1} s ago (limit {:.1} s)",
                            age.as_secs_f64(),
                            max_age.as_secs_f64()
                        ));
                    }
                }
            }
        }
        if failing.is_empty() {
            Ok(())
        } else {
            Err(NotReady(failing))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_condition_gates_readiness_until_set() {
        let health = Health::new(Duration::from_secs(60));
        assert_eq!(health.ready(), Ok(()));
        health.expect("partitions", "no partitions assigned yet");
        assert_eq!(
            health.ready(),
            Err(NotReady(vec![
                "partitions: no partitions assigned yet".to_string()
            ]))
        );
        health.set_ready("partitions");
        assert_eq!(health.ready(), Ok(()));
        health.set_not_ready("partitions", "revoked");
        assert_eq!(
            health.ready(),
            Err(NotReady(vec!["partitions: revoked".to_string()]))
        );
        health.forget("partitions");
        assert_eq!(health.ready(), Ok(()));
    }

    #[test]
    fn a_fresh_check_expires() {
        let health = Health::new(Duration::from_secs(60));
        health.expect_fresh("drained", Duration::from_millis(50));
        assert!(health.ready().unwrap_err().0[0].starts_with("drained: not yet"));
        health.touch("drained");
        assert_eq!(health.ready(), Ok(()));
        std::thread::sleep(Duration::from_millis(120));
        let why = health.ready().unwrap_err();
        assert!(why.0[0].starts_with("drained: last "), "{why}");
        health.touch("drained");
        assert_eq!(health.ready(), Ok(()));
    }

    #[test]
    fn a_stalled_loop_is_neither_alive_nor_ready() {
        let health = Health::new(Duration::from_millis(50));
        assert_eq!(health.alive(), Ok(()));
        std::thread::sleep(Duration::from_millis(120));
        assert!(health.alive().is_err());
        assert!(health.ready().unwrap_err().0[0].starts_with("main loop: no progress"));
        health.beat();
        assert_eq!(health.alive(), Ok(()));
        assert_eq!(health.ready(), Ok(()));
    }
}
