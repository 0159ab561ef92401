//! One watched kind's list/watch loop, and its probe. Written out rather than taken from
//! kube-runtime's watcher because the source needs what that watcher keeps to itself: the
//! `resourceVersion` of every event, bookmark and list, and when a list was asked for (see
//! [`crate::progress`]). The mechanics are the watcher's: a paged, consistent list (`Init`,
//! `InitApply`…, `InitDone`), then a watch from the list's version with bookmarks, resumed from
//! the last version seen whenever it ends (the server closes it at `timeoutSeconds`) or fails;
//! a `410 Gone` (the version was compacted away) lists again; failures are retried with the
//! source's backoff. Each message is stamped on arrival.
use std::{collections::VecDeque, pin::Pin, time::Duration};

use flowlog_identity::now_ns;
use futures::{Stream, StreamExt, future::BoxFuture};
use k8s_openapi::serde::de::DeserializeOwned;
use kube::{
    Api, Client, Resource,
    api::{ListParams, WatchEvent, WatchParams},
};

use crate::{
    claims::{Claim, Place, object_key},
    progress::Version,
    settings::KubernetesSettings,
    source::{Exponential, KubernetesError},
};

/// Objects asked for per list page (as kube-runtime's watcher).
const PAGE: u32 = 500;
/// A watch that says nothing for this long past its timeout is taken to be dead.
const SILENCE_GRACE: Duration = Duration::from_secs(5);

/// An object as it is now, reduced to what the source uses: its key, its claims, whether it is
/// terminating, and for a node, its name and place.
pub struct Seen {
    pub key: String,
    pub claims: Vec<Claim>,
    pub terminating: bool,
    pub place: Option<(String, Place)>,
}

/// A message's version and when it arrived.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub version: Version,
    pub arrived_ns: u64,
}

/// A complete list: its version, when its first page was asked for, when its last came.
#[derive(Debug, Clone)]
pub struct Listed {
    pub version: Version,
    pub sent_ns: u64,
    pub done_ns: u64,
}

/// One message of one watched kind (the index of the kind in the source's kinds), with the
/// kind's claims already computed, so the merged stream carries no generic object types.
pub enum Msg {
    Init(usize),
    InitApply(usize, Seen),
    InitDone(usize, Listed),
    Apply(usize, Seen, Stamp),
    Delete(usize, String, Stamp),
    /// A bookmark: the stream has delivered everything up to this version.
    Bookmark(usize, Version),
    Error(usize, KubernetesError),
}

impl Msg {
    pub fn kind(&self) -> usize {
        match self {
            Msg::Init(k)
            | Msg::InitApply(k, _)
            | Msg::InitDone(k, _)
            | Msg::Apply(k, _, _)
            | Msg::Delete(k, _, _)
            | Msg::Bookmark(k, _)
            | Msg::Error(k, _) => *k,
        }
    }
}

pub type MsgStream = Pin<Box<dyn Stream<Item = Msg> + Send>>;

type Events<K> = Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<K>>> + Send>>;

enum State<K> {
    /// A list is due.
    Start,
    /// Listing: objects of the current page still to hand out, the next page's token, the
    /// list's version (from its first page) and when that page was asked for.
    Listing {
        objects: VecDeque<K>,
        next: Option<String>,
        version: Option<String>,
        sent_ns: u64,
    },
    /// A watch from `version` is due.
    Resume {
        version: String,
    },
    Watching {
        version: String,
        events: Events<K>,
    },
}

struct Loop<K> {
    api: Api<K>,
    kind: usize,
    name: &'static str,
    seen: Box<dyn Fn(&K) -> Seen + Send>,
    timeout: u32,
    backoff: Exponential,
    /// An error was just reported: wait out the backoff before the next request.
    retry: bool,
    state: State<K>,
}

impl<K> Loop<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    fn failed(&mut self, error: KubernetesError, next: State<K>) -> Option<Msg> {
        self.retry = true;
        self.state = next;
        Some(Msg::Error(self.kind, error))
    }

    fn stamp(&self, object: &K) -> Option<Stamp> {
        let version = object.meta().resource_version.as_deref().unwrap_or("");
        (!version.is_empty()).then(|| Stamp {
            version: Version::parse(version),
            arrived_ns: now_ns(),
        })
    }

    /// Advances the loop by one step; a message if the step made one.
    async fn step(&mut self) -> Option<Msg> {
        if std::mem::take(&mut self.retry) {
            let delay = self.backoff.next().unwrap_or(Duration::from_secs(1));
            tokio::time::sleep(delay).await;
        }
        let kind = self.kind;
        match std::mem::replace(&mut self.state, State::Start) {
            State::Start => {
                self.state = State::Listing {
                    objects: VecDeque::new(),
                    next: None,
                    version: None,
                    sent_ns: 0,
                };
                Some(Msg::Init(kind))
            }
            State::Listing {
                mut objects,
                next,
                version,
                sent_ns,
            } => {
                if let Some(object) = objects.pop_front() {
                    let seen = (self.seen)(&object);
                    self.state = State::Listing {
                        objects,
                        next,
                        version,
                        sent_ns,
                    };
                    return Some(Msg::InitApply(kind, seen));
                }
                if let (None, Some(version)) = (&next, &version) {
                    let listed = Listed {
                        version: Version::parse(version),
                        sent_ns,
                        done_ns: now_ns(),
                    };
                    self.state = State::Resume {
                        version: version.clone(),
                    };
                    return Some(Msg::InitDone(kind, listed));
                }
                // The next page (the first: no token, and the list's time is now).
                let first = version.is_none();
                let sent_ns = if first { now_ns() } else { sent_ns };
                let params = ListParams {
                    limit: Some(PAGE),
                    continue_token: next,
                    ..ListParams::default()
                };
                match self.api.list(&params).await {
                    Ok(list) => {
                        let version =
                            version.or(list.metadata.resource_version.filter(|v| !v.is_empty()));
                        let next = list.metadata.continue_.filter(|c| !c.is_empty());
                        if version.is_none() {
                            let error = KubernetesError::NoVersion { kind: self.name };
                            return self.failed(error, State::Start);
                        }
                        self.state = State::Listing {
                            objects: list.items.into(),
                            next,
                            version,
                            sent_ns,
                        };
                        None
                    }
                    Err(source) => {
                        let error = KubernetesError::List {
                            kind: self.name,
                            source,
                        };
                        self.failed(error, State::Start)
                    }
                }
            }
            State::Resume { version } => {
                let params = WatchParams {
                    bookmarks: true,
                    timeout: Some(self.timeout),
                    ..WatchParams::default()
                };
                match self.api.watch(&params, &version).await {
                    Ok(events) => {
                        self.state = State::Watching {
                            version,
                            events: events.boxed(),
                        };
                        None
                    }
                    Err(source) => {
                        let error = KubernetesError::Watch {
                            kind: self.name,
                            source,
                        };
                        self.failed(error, State::Resume { version })
                    }
                }
            }
            State::Watching {
                version,
                mut events,
            } => {
                let silence = Duration::from_secs(self.timeout.into()) + SILENCE_GRACE;
                let event = match tokio::time::timeout(silence, events.next()).await {
                    Ok(event) => event,
                    Err(_) => {
                        let error = KubernetesError::Silent {
                            kind: self.name,
                            secs: silence.as_secs(),
                        };
                        return self.failed(error, State::Resume { version });
                    }
                };
                match event {
                    // The server ended the watch (its timeout): resume where it stopped.
                    None => {
                        self.state = State::Resume { version };
                        None
                    }
                    Some(Ok(WatchEvent::Added(object) | WatchEvent::Modified(object))) => {
                        let Some(stamp) = self.stamp(&object) else {
                            let error = KubernetesError::NoVersion { kind: self.name };
                            return self.failed(error, State::Start);
                        };
                        let seen = (self.seen)(&object);
                        self.state = State::Watching {
                            version: object.meta().resource_version.clone().unwrap_or_default(),
                            events,
                        };
                        Some(Msg::Apply(kind, seen, stamp))
                    }
                    Some(Ok(WatchEvent::Deleted(object))) => {
                        let Some(stamp) = self.stamp(&object) else {
                            let error = KubernetesError::NoVersion { kind: self.name };
                            return self.failed(error, State::Start);
                        };
                        self.state = State::Watching {
                            version: object.meta().resource_version.clone().unwrap_or_default(),
                            events,
                        };
                        Some(Msg::Delete(kind, object_key(object.meta()), stamp))
                    }
                    Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                        let version = bookmark.metadata.resource_version;
                        let parsed = Version::parse(&version);
                        self.state = State::Watching { version, events };
                        Some(Msg::Bookmark(kind, parsed))
                    }
                    // 410 Gone: the version is too old to resume from; list again.
                    Some(Ok(WatchEvent::Error(status))) => {
                        let next = match status.code {
                            410 => State::Start,
                            _ => State::Resume { version },
                        };
                        let error = KubernetesError::WatchStatus {
                            kind: self.name,
                            code: status.code,
                            message: status.message.clone(),
                        };
                        self.failed(error, next)
                    }
                    Some(Err(source)) => {
                        let error = KubernetesError::Watch {
                            kind: self.name,
                            source,
                        };
                        self.failed(error, State::Resume { version })
                    }
                }
            }
        }
    }
}

/// The list/watch loop of all objects of `K` (all namespaces) as a stream of [`Msg`]s of kind
/// `kind` (named `name` in errors).
pub fn watch<K>(
    client: Client,
    kind: usize,
    name: &'static str,
    settings: &KubernetesSettings,
    claims_of: fn(&K, &KubernetesSettings) -> Vec<Claim>,
    place_of: fn(&K) -> Option<(String, Place)>,
) -> MsgStream
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let backoff = Exponential::new(settings.backoff_min, settings.backoff_max);
    let timeout = u32::try_from(settings.watch_timeout.as_secs().max(1)).unwrap_or(u32::MAX);
    let settings = settings.clone();
    let looped = Loop {
        api: Api::<K>::all(client),
        kind,
        name,
        seen: Box::new(move |o: &K| Seen {
            key: object_key(o.meta()),
            claims: claims_of(o, &settings),
            terminating: o.meta().deletion_timestamp.is_some(),
            place: place_of(o),
        }),
        timeout,
        backoff,
        retry: false,
        state: State::Start,
    };
    futures::stream::unfold(looped, |mut looped| async move {
        loop {
            if let Some(msg) = looped.step().await {
                return Some((msg, looped));
            }
        }
    })
    .boxed()
}

/// One probe of `K`: a consistent list of one object, whose answer carries the collection's
/// current version. Returns (sent, answered, version).
pub fn probe<K>(
    client: Client,
    name: &'static str,
) -> BoxFuture<'static, Result<(u64, u64, Version), KubernetesError>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    Box::pin(async move {
        let api = Api::<K>::all(client);
        let params = ListParams {
            limit: Some(1),
            ..ListParams::default()
        };
        let sent_ns = now_ns();
        let list = api
            .list(&params)
            .await
            .map_err(|source| KubernetesError::Probe { kind: name, source })?;
        let answered_ns = now_ns();
        match list.metadata.resource_version.filter(|v| !v.is_empty()) {
            Some(version) => Ok((sent_ns, answered_ns, Version::parse(&version))),
            None => Err(KubernetesError::NoVersion { kind: name }),
        }
    })
}
