//! Building an EC2 client for the binaries from a few flags: a region, an optional endpoint (an
//! EC2-compatible server such as moto, or a VPC endpoint), optional static credentials. Without
//! static credentials the SDK's default chain applies (environment, profile files, web identity /
//! IRSA, ECS and instance metadata), which is what a deployment on AWS wants; SSO profiles are
//! not supported (aws-config is built without its `sso` feature to keep the build lean).
use std::{fmt, time::Duration};

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_ec2::config::Credentials;

/// Static credentials (tests, or a deployment that passes keys explicitly).
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for StaticCredentials {
    /// Never prints the secret or the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// How to reach EC2.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The region to query (and to name in identities). `None`: the SDK's default chain
    /// (`AWS_REGION`, profile, instance metadata).
    pub region: Option<String>,
    /// An endpoint to use instead of the region's public one (e.g. `http://127.0.0.1:5000`).
    pub endpoint: Option<String>,
    /// Static credentials instead of the default chain.
    pub credentials: Option<StaticCredentials>,
    /// Attempts per API call (per page) inside the SDK, whose standard retry mode backs off on
    /// throttling and transient errors before [`Ec2Source`](crate::Ec2Source) backs off whole
    /// polls. 1 = no retries (tests that want failures to show at once).
    pub max_attempts: u32,
    /// Time limit for one attempt of one call: a hung connection must not stall polling forever.
    pub attempt_timeout: Duration,
    /// Time limit for connecting.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            region: None,
            endpoint: None,
            credentials: None,
            max_attempts: 3,
            attempt_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// An EC2 client for `options`. Loading the default chain may read profile files and, on EC2,
/// ask instance metadata for the region; credentials are resolved lazily, at the first call, so
/// missing ones show up as a failed poll (kind `dispatch`), not here.
pub async fn build_client(options: &ClientOptions) -> aws_sdk_ec2::Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(options.max_attempts.max(1)))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(options.connect_timeout)
                .operation_attempt_timeout(options.attempt_timeout)
                .build(),
        );
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &options.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(c) = &options.credentials {
        loader = loader.credentials_provider(Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            c.session_token.clone(),
            None,
            "flowlog-static",
        ));
    }
    aws_sdk_ec2::Client::new(&loader.load().await)
}
