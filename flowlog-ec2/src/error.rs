//! Why a poll of the EC2 API failed, sorted into a few kinds: the kind picks nothing about what
//! happens next (every failure backs off the same way and leaves the index alone), but it labels
//! the error counter, so that throttling (`RequestLimitExceeded`) can be told from an outage or
//! missing permissions on a dashboard.
use std::fmt;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

/// What went wrong with one EC2 API call (any page of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The API said slow down (`RequestLimitExceeded`, `Throttling`, ...).
    Throttled,
    /// The credentials were refused or lack a permission (`AuthFailure`, `UnauthorizedOperation`).
    Denied,
    /// Any other error answer of the service.
    Service,
    /// No answer in time (connect or attempt timeout).
    Timeout,
    /// The request could not be sent (connection refused, DNS, TLS, no credentials).
    Dispatch,
    /// An answer that could not be read.
    Response,
    /// The request could not be built (a bad endpoint or parameter).
    Construction,
}

impl ErrorKind {
    /// The `kind` label of `flowlog_identity_source_errors_total{source="ec2"}`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Throttled => "throttled",
            ErrorKind::Denied => "denied",
            ErrorKind::Service => "service",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Dispatch => "dispatch",
            ErrorKind::Response => "response",
            ErrorKind::Construction => "construction",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error codes EC2 (and the SDK's other services) use to say "too many requests".
const THROTTLING_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
];

/// Error codes for refused credentials or missing permissions.
const DENIED_CODES: &[&str] = &[
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "RequestExpired",
];

/// A failed EC2 API call: which call, what kind of failure, and the service's code and message
/// when it answered. A failure without an answer (dispatch, timeout, an unreadable response)
/// keeps the SDK's error as its `source()`, whose own chain says what happened (its `Display`
/// alone often says only "dispatch failure"): log it with `flowlog_diag::error_chain`.
#[derive(Debug, thiserror::Error)]
#[error(
    "EC2 {operation} failed ({kind}{}){}",
    code.as_deref().map(|c| format!(", {c}")).unwrap_or_default(),
    message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
)]
pub struct Ec2Error {
    /// `DescribeNetworkInterfaces` or `DescribeInstances`.
    pub operation: &'static str,
    pub kind: ErrorKind,
    /// The service's error code, when it answered with one.
    pub code: Option<String>,
    /// The service's message, when it answered.
    pub message: Option<String>,
    /// The SDK's error, for a failure the service did not answer.
    #[source]
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Ec2Error {
    /// Sorts an SDK error from `operation` into a kind, and keeps the service's message or the
    /// error chain.
    pub fn from_sdk<E, R>(operation: &'static str, error: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        let code = error.code().map(str::to_owned);
        let kind = match &error {
            SdkError::ServiceError(_) => match code.as_deref() {
                Some(c) if THROTTLING_CODES.contains(&c) => ErrorKind::Throttled,
                Some(c) if DENIED_CODES.contains(&c) => ErrorKind::Denied,
                _ => ErrorKind::Service,
            },
            SdkError::TimeoutError(_) => ErrorKind::Timeout,
            SdkError::DispatchFailure(failure) if failure.is_timeout() => ErrorKind::Timeout,
            SdkError::DispatchFailure(_) => ErrorKind::Dispatch,
            SdkError::ResponseError(_) => ErrorKind::Response,
            SdkError::ConstructionFailure(_) => ErrorKind::Construction,
            _ => ErrorKind::Service,
        };
        let (message, cause) = match &error {
            SdkError::ServiceError(_) => (
                Some(error.message().unwrap_or("(no message)").to_owned()),
                None,
            ),
            _ => (
                None,
                Some(Box::new(error) as Box<dyn std::error::Error + Send + Sync>),
            ),
        };
        Self {
            operation,
            kind,
            code,
            message,
            cause,
        }
    }
}
