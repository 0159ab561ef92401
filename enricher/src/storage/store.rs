//! Where Parquet files go: a local directory or an S3-compatible bucket, both behind
//! `object_store`'s [`ObjectStore`], whose `put` is atomic on both (a local put writes a staged
//! file and renames it; an S3 PUT is all or nothing). So a file is visible only when complete,
//! and the sink needs no temp-name protocol of its own.
use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, aws::AmazonS3Builder,
    local::LocalFileSystem, path::Path,
};
use tracing::warn;

use super::StorageError;

/// How to reach an S3-compatible store. Unset fields fall back to the standard `AWS_*`
/// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, `AWS_ENDPOINT_URL`, ...) and then to the instance's or pod's role, as
/// `object_store`'s `AmazonS3Builder::from_env` reads them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint of an S3-compatible service (MinIO, moto, Ceph: `http://127.0.0.1:5000`);
    /// `None` is AWS itself.
    pub endpoint: Option<String>,
    /// Region to sign for (`us-east-1` when neither this nor the environment says).
    pub region: Option<String>,
    /// Allow `http://` endpoints (test and on-premises stores); refused otherwise.
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Virtual-hosted-style requests (`https://bucket.host/key`) instead of path style
    /// (`endpoint/bucket/key`, the default, which moto, MinIO and most S3-compatible stores
    /// accept). With an `endpoint`, that endpoint must then already name the bucket
    /// (`https://bucket.s3.example.com`), as `object_store` uses it unchanged.
    pub virtual_hosted_style: bool,
}

/// Secrets stay out of logs and error messages.
impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .finish()
    }
}

/// A store and the key prefix under which the sink writes.
pub(crate) struct Target {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
}

/// Requests that fail transiently are retried inside `object_store` only briefly: the sink
/// retries whole uploads itself, forever and with its own backoff, and a start-up check
/// against an unreachable endpoint should fail in seconds, not minutes.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(15),
    }
}

/// Opens the store that `url` names: `s3://bucket/prefix`, `file:///abs/dir` or a plain
/// directory path (created if missing).
pub(crate) fn open(url: &str, s3: &S3Options) -> Result<Target, StorageError> {
    let config = |reason: String| StorageError::Config {
        url: url.to_string(),
        reason,
    };
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(config("no bucket name after s3://".into()));
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_allow_http(s3.allow_http)
            .with_virtual_hosted_style_request(s3.virtual_hosted_style)
            .with_retry(retry_config());
        if let Some(v) = &s3.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &s3.region {
            b = b.with_region(v);
        }
        if let Some(v) = &s3.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &s3.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = &s3.session_token {
            b = b.with_token(v);
        }
        let store = b.build().map_err(|source| StorageError::Store {
            url: url.to_string(),
            source,
        })?;
        let prefix = Path::parse(prefix).map_err(|source| StorageError::Prefix {
            url: url.to_string(),
            source,
        })?;
        return Ok(Target {
            store: Arc::new(store),
            prefix,
        });
    }
    let dir: PathBuf = if url.starts_with("file:") {
        let parsed = url::Url::parse(url).map_err(|source| StorageError::Url {
            url: url.to_string(),
            source,
        })?;
        parsed
            .to_file_path()
            .map_err(|()| config("not an absolute local path".into()))?
    } else if url.contains("://") {
        return Err(config(
            "unsupported scheme (use s3://bucket/prefix, file:///dir or a directory path)".into(),
        ));
    } else if url.is_empty() {
        return Err(config("empty path".into()));
    } else {
        PathBuf::from(url)
    };
    std::fs::create_dir_all(&dir).map_err(|source| StorageError::CreateDir {
        url: url.to_string(),
        dir: dir.clone(),
        source,
    })?;
    let store = LocalFileSystem::new_with_prefix(&dir)
        .map_err(|source| StorageError::Store {
            url: url.to_string(),
            source,
        })?
        // A put returns only once the file and its directory entry are on disk: the sink
        // reports rows as durable after it.
        .with_fsync(true);
    Ok(Target {
        store: Arc::new(store),
        prefix: Path::default(),
    })
}

/// Proves the target takes writes: puts a small object under `_flowlog_check/` (a name that
/// dataset readers skip, as they skip every `_`-prefixed name) and deletes it. A store that
/// allows writes but not deletes passes, with a warning about the leftover object.
pub(crate) async fn check_writable(
    target: &Target,
    url: &str,
    run_id: &str,
) -> Result<(), StorageError> {
    let location = target
        .prefix
        .clone()
        .join("_flowlog_check")
        .join(run_id.to_string());
    target
        .store
        .put(&location, PutPayload::from_static(b"flowlog write check\n"))
        .await
        .map_err(|source| StorageError::NotWritable {
            url: url.to_string(),
            source,
        })?;
    if let Err(e) = target.store.delete(&location).await {
        warn!(url, object = %location, error = %e, "could not delete the write-check object");
    }
    Ok(())
}
