//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics
//! (`tools/leaderelection`), so that of N replicas of a process exactly one acts at a time —
//! and never two, not even for a moment.
//!
//! # Protocol
//! Each candidate has an identity (its pod name). One round ([`LeaseLock::try_acquire_or_renew`])
//! reads the Lease, then:
//! - if it does not exist, creates it holding it (`leaseTransitions: 0`); a `409 AlreadyExists`
//!   means another candidate created it first;
//! - if another holder has it and the candidate has **not seen the Lease change for
//!   `leaseDurationSeconds`**, or it has no holder (released), takes it; if the candidate holds it,
//!   renews it (`renewTime`). Either way by an update (`PUT`) carrying the `resourceVersion` it
//!   read: if anyone wrote in between, the API server answers `409 Conflict` and nothing happens.
//!   Taking it from another (or from nobody) counts one more `leaseTransitions`.
//!
//! The leader renews every [`ElectionConfig::renew_period`] (a third of the lease duration),
//! retrying every [`ElectionConfig::retry_period`]; candidates retry every retry period, and wake
//! up exactly when the Lease they watch would expire. On shutdown the leader **releases** the
//! Lease (holder cleared, duration 1 s, as client-go's `ReleaseOnCancel`), and a standby takes it
//! at its next round instead of waiting for the expiry.
//!
//! # Why two leaders never overlap
//! Expiry is measured with each **observer's own monotonic clock, from when it observed a
//! change** of the Lease (a new `resourceVersion`), never from the holder's `renewTime`: the
//! holder's wall clock may be off by any amount, but clocks *rates* agree closely. Write `D` for
//! the lease duration and `R` for the renew deadline (two thirds of `D`).
//! - A leader's term ends `R` after the **start** of its last successful renewal (before its read
//!   was sent): the [`Term`]'s deadline. When it passes without a renewal, the process must stop
//!   acting at once — [`spawn_fence`] runs on a thread of its own, so a stalled async runtime
//!   cannot delay it, and `flowlog-inventory` ends the process there (exit 1: everything it was
//!   sending dies with it, nothing can be delivered later from a queue).
//! - A renewal that succeeded reached the API server at some moment `S` after its start, and
//!   every other candidate that later takes the Lease must have observed that very version (its
//!   update carries the `resourceVersion` it read, and any later write would make it fail with
//!   `409`). It observed it at `O ≥ S` and waits until `O + D` on its own clock.
//! - So the old leader stopped by `start + R ≤ S + R < O + D`, before the new one begins: the
//!   margin `D − R` (5 s at the default 15 s) covers the difference of the two clocks' rates
//!   over `D`, the time it takes to stop, and the network delay of a message already sent.
//!
//! What this cannot rule out, like every lease without fencing at the destination: a process
//! frozen as a whole for longer than the margin (SIGSTOP, a paused VM) resumes all its threads
//! at once, and a message already queued may leave before the fence thread runs. Only the
//! broker could refuse it (Kafka transactions with one `transactional.id` shared by the
//! replicas); that is not done here.
//!
//! A leader that fails to renew before its deadline does not become a candidate again in the
//! same process: ending the process is the only way to be sure that no publish from its queues
//! lands later, and Kubernetes restarts it as a standby (see `flowlog-inventory`). A restarted
//! process with the same identity that finds itself the holder renews at once, as client-go
//! does: its previous incarnation is gone (the kubelet restarts a container only after it
//! exited). Identities must therefore be unique per replica; the pod name is.
use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use flowlog_diag::{LogThrottle, error_chain};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tracing::{debug, info, warn};

/// Where the Lease is, who this candidate is, and how long a lease lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity, unique among the replicas (the pod name).
    pub identity: String,
    /// How long candidates wait, after they last saw the Lease change, before they take it.
    /// Whole seconds (the Lease stores seconds), at least 3.
    pub lease_duration: Duration,
}

impl ElectionConfig {
    /// A configuration, checking the lease duration.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
        lease_duration: Duration,
    ) -> Result<Self, ElectionError> {
        if lease_duration.subsec_nanos() != 0 || lease_duration < Duration::from_secs(3) {
            return Err(ElectionError::Duration(lease_duration));
        }
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
        })
    }

    /// How often the leader renews: a third of the lease duration.
    pub fn renew_period(&self) -> Duration {
        self.lease_duration / 3
    }

    /// How long after the start of its last successful renewal a leader still acts: two thirds of
    /// the lease duration (client-go's 10 s of 15 s), leaving a third as the safety margin.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// How often candidates look at the Lease, and how soon a failed renewal is tried again:
    /// 2/15 of the lease duration (client-go's 2 s of 15 s).
    pub fn retry_period(&self) -> Duration {
        self.lease_duration * 2 / 15
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a round of the election failed (it is retried; only the caller's deadline matters).
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("the lease duration must be a whole number of seconds, at least 3 s (got {0:?})")]
    Duration(Duration),
    #[error("{action} the Lease {lease}")]
    Api {
        action: &'static str,
        lease: String,
        source: kube::Error,
    },
    #[error("{action} the Lease {lease}: no answer within {after:?}")]
    Timeout {
        action: &'static str,
        lease: String,
        after: Duration,
    },
}

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This candidate holds the Lease (just acquired, or renewed).
    Held,
    /// `holder` holds it; it can be taken if it does not change for `wait` more.
    HeldBy { holder: String, wait: Duration },
    /// Someone wrote the Lease between this round's read and its write (`409`).
    Conflict,
}

/// The version of the Lease a candidate saw last, and when (its own monotonic clock).
#[derive(Debug, Clone)]
struct Observed {
    resource_version: String,
    at: Instant,
}

/// One candidate's view of one Lease, and the API calls of client-go's `tryAcquireOrRenew`:
/// get, create, update (the RBAC verbs it needs, in the Lease's namespace).
pub struct LeaseLock {
    api: Api<Lease>,
    config: ElectionConfig,
    observed: Option<Observed>,
}

fn api_error(
    action: &'static str,
    config: &ElectionConfig,
) -> impl FnOnce(kube::Error) -> ElectionError + use<> {
    let lease = config.lease();
    move |source| ElectionError::Api {
        action,
        lease,
        source,
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    pub fn new(client: Client, config: ElectionConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    pub fn config(&self) -> &ElectionConfig {
        &self.config
    }

    /// Notes the version read (a new one restarts the expiry clock).
    fn observe(&mut self, lease: &Lease, at: Instant) {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        if self
            .observed
            .as_ref()
            .is_none_or(|o| o.resource_version != version)
        {
            self.observed = Some(Observed {
                resource_version: version,
                at,
            });
        }
    }

    /// This candidate's record: a new Lease's (`old: None`, no transition yet), or taking over
    /// from `old` (one more transition), or renewing its own (acquisition and transitions kept).
    fn record(&self, old: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let created = old.is_none();
        let old = old.cloned().unwrap_or_default();
        let renewing = old.holder_identity.as_deref() == Some(self.config.identity.as_str());
        let transitions = old.lease_transitions.unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_seconds()),
            renew_time: Some(now.clone()),
            acquire_time: if renewing {
                old.acquire_time.clone().or(Some(now))
            } else {
                Some(now)
            },
            lease_transitions: Some(if created || renewing {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..old
        }
    }

    /// One round of client-go's `tryAcquireOrRenew` (see the module documentation).
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, ElectionError> {
        let config = &self.config;
        let Some(mut lease) = self
            .api
            .get_opt(&config.name)
            .await
            .map_err(api_error("reading", config))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.record(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created, Instant::now());
                    Ok(Attempt::Held)
                }
                Err(e) if is_conflict(&e) => Ok(Attempt::Conflict),
                Err(e) => Err(api_error("creating", &self.config)(e)),
            };
        };
        let read_at = Instant::now();
        self.observe(&lease, read_at);
        let spec = lease.spec.clone().unwrap_or_default();
        if let Some(holder) = spec.holder_identity.as_deref().filter(|h| !h.is_empty())
            && holder != self.config.identity
        {
            // The holder's promise, timed from our own observation of its last write.
            let duration = spec
                .lease_duration_seconds
                .filter(|&s| s > 0)
                .map_or(self.config.lease_duration, |s| {
                    Duration::from_secs(s.unsigned_abs().into())
                });
            let observed_at = self.observed.as_ref().map_or(read_at, |o| o.at);
            let expires = observed_at + duration;
            if read_at < expires {
                return Ok(Attempt::HeldBy {
                    holder: holder.to_string(),
                    wait: expires - read_at,
                });
            }
        }
        lease.spec = Some(self.record(Some(&spec)));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated, Instant::now());
                Ok(Attempt::Held)
            }
            Err(e) if is_conflict(&e) => Ok(Attempt::Conflict),
            Err(e) => Err(api_error("updating", &self.config)(e)),
        }
    }

    /// Gives the Lease up if this candidate holds it (holder cleared, duration 1 s, transitions
    /// kept, as client-go's release), so that a standby takes it at its next round. Returns
    /// whether it was released (false: someone else held it, or wrote it meanwhile).
    pub async fn release(&mut self) -> Result<bool, ElectionError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(api_error("reading", &self.config))?
        else {
            return Ok(false);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(false);
        }
        let now = MicroTime(Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..spec
        });
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated, Instant::now());
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(api_error("releasing", &self.config)(e)),
        }
    }
}

/// A term of leadership: the moment by which it ends unless renewed. Shared by the renewing task
/// and the [`spawn_fence`] thread that enforces it.
#[derive(Debug, Clone)]
pub struct Term {
    state: Arc<(Mutex<TermState>, Condvar)>,
}

#[derive(Debug)]
struct TermState {
    deadline: Instant,
    /// The term ended normally (the Lease was released): the fence stands down.
    retired: bool,
}

impl Term {
    fn new(deadline: Instant) -> Self {
        Self {
            state: Arc::new((
                Mutex::new(TermState {
                    deadline,
                    retired: false,
                }),
                Condvar::new(),
            )),
        }
    }

    /// When the term ends unless renewed.
    pub fn deadline(&self) -> Instant {
        self.state.0.lock().expect("term poisoned").deadline
    }

    fn extend(&self, deadline: Instant) {
        let mut state = self.state.0.lock().expect("term poisoned");
        state.deadline = state.deadline.max(deadline);
    }

    /// Ends the term now: the fence fires at once (leadership was taken by another).
    pub fn end_now(&self) {
        let mut state = self.state.0.lock().expect("term poisoned");
        state.deadline = Instant::now();
        self.state.1.notify_all();
    }

    /// The leader stopped acting and released the Lease: the fence stands down.
    pub fn retire(&self) {
        self.state.0.lock().expect("term poisoned").retired = true;
        self.state.1.notify_all();
    }
}

/// Runs `on_expiry` on a thread of its own as soon as `term`'s deadline passes without renewal
/// (unless it is retired first). The caller's `on_expiry` must stop everything the leader does —
/// `flowlog-inventory` ends the process — and it runs even if the async runtime is stalled.
pub fn spawn_fence(
    term: Term,
    on_expiry: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lease-fence".to_string())
        .spawn(move || {
            let (lock, changed) = &*term.state;
            let mut state = lock.lock().expect("term poisoned");
            loop {
                if state.retired {
                    return;
                }
                let now = Instant::now();
                if now >= state.deadline {
                    break;
                }
                let wait = state.deadline - now;
                state = changed.wait_timeout(state, wait).expect("term poisoned").0;
            }
            drop(state);
            on_expiry();
        })
}

/// Why a leader stopped being one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// No renewal succeeded before the term's deadline.
    Deadline,
    /// Another candidate holds the Lease.
    TakenBy(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Deadline => f.write_str("no renewal succeeded before the renew deadline"),
            Lost::TakenBy(holder) => write!(f, "the Lease is held by {holder}"),
        }
    }
}

/// A failure that repeats is logged once, then at most once a minute with its count.
#[derive(Debug, Default)]
struct Failures(LogThrottle);

impl Failures {
    fn failed(&mut self, e: &ElectionError) {
        metrics::counter!(crate::metrics::LEASE_ERRORS).increment(1);
        if self.0.hit() {
            warn!(
                failures = self.0.count,
                "leader election: {}; retrying",
                error_chain(e)
            );
        }
    }

    fn succeeded(&mut self) {
        let failures = self.0.clear();
        if failures > 0 {
            info!(failures, "leader election: the Lease is reachable again");
        }
    }
}

/// A candidate that waits for the Lease ([`Elector::acquire`]), keeps it
/// ([`Elector::hold`]) and gives it up ([`Elector::release`]).
pub struct Elector {
    lock: LeaseLock,
    /// Called after every round that reached the API server (readiness of a standby).
    on_contact: Box<dyn Fn() + Send + Sync>,
    failures: Failures,
}

impl Elector {
    pub fn new(client: Client, config: ElectionConfig) -> Self {
        Self {
            lock: LeaseLock::new(client, config),
            on_contact: Box::new(|| {}),
            failures: Failures::default(),
        }
    }

    /// Calls `f` after every round that read the Lease.
    pub fn on_contact(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_contact = Box::new(f);
        self
    }

    pub fn config(&self) -> &ElectionConfig {
        self.lock.config()
    }

    /// One round, bounded by `limit`.
    async fn round(&mut self, limit: Duration) -> Result<Attempt, ElectionError> {
        let lease = self.lock.config().lease();
        let attempt = tokio::time::timeout(limit, self.lock.try_acquire_or_renew())
            .await
            .unwrap_or_else(|_| {
                Err(ElectionError::Timeout {
                    action: "acquiring or renewing",
                    lease,
                    after: limit,
                })
            });
        match &attempt {
            Ok(_) => {
                self.failures.succeeded();
                (self.on_contact)();
            }
            Err(e) => self.failures.failed(e),
        }
        attempt
    }

    /// Waits until this candidate holds the Lease; returns the term that began. Errors are
    /// logged and retried (cancel the future to stop waiting).
    pub async fn acquire(&mut self) -> Term {
        let config = self.lock.config().clone();
        let retry = config.retry_period();
        let mut last_holder = None;
        loop {
            let started = Instant::now();
            let pause = match self.round(config.renew_period()).await {
                Ok(Attempt::Held) => return Term::new(started + config.renew_deadline()),
                Ok(Attempt::HeldBy { holder, wait }) => {
                    if last_holder.as_ref() != Some(&holder) {
                        info!(lease = %config.lease(), %holder, "standing by: the Lease is held");
                        last_holder = Some(holder);
                    }
                    // Wake exactly when it would expire, if that is sooner than the next round.
                    wait.min(retry)
                }
                Ok(Attempt::Conflict) => {
                    debug!(lease = %config.lease(), "another candidate wrote the Lease first");
                    retry
                }
                Err(_) => retry,
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Keeps the Lease of `term`: renews every renew period, retries failures every retry
    /// period, extends the term's deadline after each success. Returns when leadership is lost
    /// (the caller must stop acting; the fence enforces the deadline regardless). Cancel the
    /// future to stop renewing (then [`Elector::release`]).
    pub async fn hold(&mut self, term: &Term) -> Lost {
        let config = self.lock.config().clone();
        loop {
            tokio::time::sleep(config.renew_period()).await;
            loop {
                let started = Instant::now();
                let Some(left) = term.deadline().checked_duration_since(started) else {
                    return Lost::Deadline;
                };
                match self.round(left).await {
                    Ok(Attempt::Held) => {
                        term.extend(started + config.renew_deadline());
                        break;
                    }
                    Ok(Attempt::HeldBy { holder, .. }) => {
                        term.end_now();
                        return Lost::TakenBy(holder);
                    }
                    Ok(Attempt::Conflict) | Err(_) => {
                        let left = term.deadline().saturating_duration_since(Instant::now());
                        tokio::time::sleep(config.retry_period().min(left)).await;
                    }
                }
            }
        }
    }

    /// Releases the Lease (see [`LeaseLock::release`]) within one renew period.
    pub async fn release(&mut self) -> Result<bool, ElectionError> {
        let config = self.lock.config().clone();
        let limit = config.renew_period();
        tokio::time::timeout(limit, self.lock.release())
            .await
            .unwrap_or_else(|_| {
                Err(ElectionError::Timeout {
                    action: "releasing",
                    lease: config.lease(),
                    after: limit,
                })
            })
    }
}
