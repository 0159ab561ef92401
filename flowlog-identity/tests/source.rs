//! The source plumbing end to end: a source spawned with `spawn_source` sends into the channel,
//! `apply_changes` applies what it sent, and a fatal error comes back through the task's handle.
use std::sync::Arc;

use flowlog_identity::{
    BoxFuture, IdentityIndex, InventorySource, OwnershipChange, SourceError, apply_changes,
    spawn_source,
};
use flowlog_record::{Endpoint, Identity, IdentityKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A source's own error, with a cause of its own.
#[derive(Debug, thiserror::Error)]
#[error("gave up")]
struct GaveUp(#[source] std::io::Error);

/// Sends one Open and a watermark, then fails for good.
struct FailingSource(Arc<Identity>);

impl InventorySource for FailingSource {
    fn name(&self) -> &str {
        "test"
    }

    fn run(
        self: Box<Self>,
        changes: mpsc::Sender<OwnershipChange>,
        _shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let sent = [
                OwnershipChange::Open {
                    source: "test".into(),
                    owner: "test/a".into(),
                    prefix: "198.51.100.0/24".parse().unwrap(),
                    identity: self.0,
                    at_ns: 10,
                },
                OwnershipChange::Watermark {
                    source: "test".into(),
                    at_ns: 20,
                },
            ];
            for change in sent {
                changes.send(change).await.unwrap();
            }
            Err(SourceError::new(
                "test",
                GaveUp(std::io::Error::other("connection reset")),
            ))
        })
    }
}

#[tokio::test]
async fn a_spawned_source_feeds_the_index_and_reports_its_fatal_error() {
    let identity = Arc::new(Identity {
        kind: IdentityKind::Static,
        name: "lab".into(),
        source: "test".into(),
        ..Identity::default()
    });
    let mut index = IdentityIndex::new();
    index.register_source("test");
    let shared = index.into_shared();
    let (tx, rx) = mpsc::channel(8);
    let applier = tokio::spawn(apply_changes(Arc::clone(&shared), rx));
    let handle = spawn_source(
        Box::new(FailingSource(Arc::clone(&identity))),
        tx,
        CancellationToken::new(),
    );
    let error = handle.await.unwrap().unwrap_err();
    assert_eq!(error.name(), "test");
    // The source's error and its cause are kept as causes, not flattened into one message.
    assert_eq!(error.to_string(), "inventory source test");
    assert_eq!(
        flowlog_diag::error_chain(&error),
        "inventory source test: gave up: connection reset"
    );
    // The source dropped its sender: the applier drains what was sent and ends.
    applier.await.unwrap();
    let index = shared.read();
    assert_eq!(index.caught_up_to(), Some(20));
    assert_eq!(
        index.lookup("198.51.100.7".parse().unwrap(), 15),
        Endpoint::exact(identity)
    );
}
