//! Kafka client plumbing that the agent (`flowlog-sidecar`), the enricher and the inventory
//! share: the settings every client of a process takes ([`settings::ClientSettings`], from
//! `--kafka-config`), the snake_case kind of a librdkafka error (a metric label), the start-up
//! check that a topic exists — which turns a refused TLS handshake or SASL authentication into
//! an error naming the broker and the cause ([`Rejection`]) —, and [`ClientErrors`], which counts
//! a client's errors and logs them through `flowlog_diag::LogThrottle`.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use flowlog_diag::LogThrottle;
use rdkafka::{
    ClientConfig,
    client::{Client, ClientContext},
    config::RDKafkaLogLevel,
    error::{KafkaError, RDKafkaErrorCode},
};
use tracing::{debug, error, warn};

pub mod settings;
pub mod tls;

pub use settings::{ClientSettings, OptionError, SettingsError, check_options};

/// snake_case label of a librdkafka error, e.g. `message_timed_out`.
pub fn error_kind(e: &KafkaError) -> String {
    let name = match e.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => return "other".to_string(),
    };
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// What a client context does with librdkafka's log lines: the severe ones are errors; the rest
/// (connection refused, broker down, ...) are debug lines, because they also arrive through the
/// context's `error` callback ([`ClientErrors`]), which counts them and logs them once a minute;
/// here they would repeat every few seconds. `FLOWLOG_LOG=librdkafka=debug` shows them all.
pub fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            error!(target: "librdkafka", "{fac}: {message}")
        }
        _ => debug!(target: "librdkafka", "{fac}: {message}"),
    }
}

/// A client's errors (brokers unreachable or failing): each counted in a metric by kind, and
/// logged the first time, then at most once a minute with the running count. Shared by the
/// client context's `error` and `log` callbacks (librdkafka's threads) and the owner's own
/// checks, which is how [`check_topic`] learns that a broker refused the client's TLS or SASL.
#[derive(Debug)]
pub struct ClientErrors {
    /// Counter name, labelled `kind`.
    metric: &'static str,
    brokers: String,
    /// What the process does meanwhile, appended to the warning ("retrying", ...).
    meanwhile: &'static str,
    throttle: Mutex<LogThrottle>,
    /// The first refused TLS handshake or SASL authentication.
    rejection: Mutex<Option<Rejection>>,
}

impl ClientErrors {
    pub fn new(metric: &'static str, brokers: impl Into<String>, meanwhile: &'static str) -> Self {
        Self {
            metric,
            brokers: brokers.into(),
            meanwhile,
            throttle: Mutex::new(LogThrottle::default()),
            rejection: Mutex::new(None),
        }
    }

    /// The `bootstrap.servers` of the client.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// For `ClientContext::error`: counts `error` by kind and logs it when due; keeps the
    /// first TLS or SASL refusal for [`check_topic`]. Reaching the end of a partition is no
    /// error (readers ask for it to know when a replay is complete): it is ignored.
    pub fn report(&self, error: &KafkaError, reason: &str) {
        if matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
        {
            return;
        }
        if let Some(rejection) = Rejection::from_error(error, reason, &self.brokers) {
            self.keep(rejection);
        }
        self.note(&error_kind(error), reason);
    }

    /// For `ClientContext::log`: logs the line ([`log`]) and keeps the first TLS or SASL
    /// refusal it reports for [`check_topic`].
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if let Some(rejection) = Rejection::from_log(fac, message, &self.brokers) {
            self.keep(rejection);
        }
        log(level, fac, message);
    }

    fn keep(&self, rejection: Rejection) {
        self.rejection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(rejection);
    }

    /// The first TLS handshake or SASL authentication a broker refused, if any.
    pub fn rejection(&self) -> Option<Rejection> {
        self.rejection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts a condition of kind `kind` and logs `what` when due.
    pub fn note(&self, kind: &str, what: &str) {
        metrics::counter!(self.metric, "kind" => kind.to_string()).increment(1);
        let mut throttle = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
        if throttle.hit() {
            warn!(
                brokers = %self.brokers,
                kind,
                count = throttle.count,
                "Kafka brokers unreachable or failing: {what}; {}",
                self.meanwhile
            );
        }
    }
}

/// Parses one `KEY=VALUE` librdkafka option of a command-line flag (clap value parser).
pub fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not a librdkafka option: use KEY=VALUE")),
    }
}

/// A broker refused the client: its TLS handshake failed (CA, host name, protocol) or its SASL
/// authentication did (mechanism, user name, password). Configuration errors that retrying does
/// not cure, reported by librdkafka through the client context's `error` callback.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("TLS handshake with Kafka broker {broker} failed: {reason}")]
    Tls { broker: String, reason: String },
    #[error(
        "SASL authentication with Kafka broker {broker} failed: {reason} (check sasl.mechanism, \
         sasl.username and sasl.password)"
    )]
    Authentication { broker: String, reason: String },
}

impl Rejection {
    /// The rejection an `error` callback reports, if it is one: an SSL or authentication error,
    /// or a transport error whose text is OpenSSL's (librdkafka reports some handshake failures
    /// so). librdkafka's `reason` starts with the broker (`ssl://localhost:9093/bootstrap: SSL
    /// handshake failed: ...`); without it, the broker is `brokers` (the bootstrap list).
    pub fn from_error(error: &KafkaError, reason: &str, brokers: &str) -> Option<Self> {
        let tls = match error.rdkafka_error_code()? {
            RDKafkaErrorCode::SSL => true,
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => false,
            RDKafkaErrorCode::BrokerTransportFailure if says_tls(reason) => true,
            _ => return None,
        };
        Some(Self::new(tls, reason, brokers))
    }

    /// The rejection a log line of librdkafka reports, if it is one: a broker failure (facility
    /// `FAIL`) whose text is a TLS handshake's or a SASL authentication's. A consumer's error
    /// events do not reach its context's `error` callback while it is not assigned anything,
    /// but its log lines do.
    pub fn from_log(fac: &str, message: &str, brokers: &str) -> Option<Self> {
        if fac != "FAIL" {
            return None;
        }
        // A log line starts with the thread's name: `[thrd:ssl://host:9093/bootstrap]: `.
        let message = match message.strip_prefix("[thrd:") {
            Some(rest) => rest.split_once("]: ").map_or(message, |(_, text)| text),
            None => message,
        };
        if says_tls(message) {
            Some(Self::new(true, message, brokers))
        } else if message.contains("SASL authentication error") {
            Some(Self::new(false, message, brokers))
        } else {
            None
        }
    }

    fn new(tls: bool, text: &str, brokers: &str) -> Self {
        let (broker, cause) = match split_broker(text) {
            Some((broker, cause)) => (broker.to_string(), cause),
            None => (brokers.to_string(), text),
        };
        if tls {
            let reason = cause
                .strip_prefix("SSL handshake failed: ")
                .unwrap_or(cause);
            Rejection::Tls {
                broker,
                reason: reason.to_string(),
            }
        } else {
            Rejection::Authentication {
                broker,
                reason: cause.to_string(),
            }
        }
    }

    /// The rejection with its cause found, where librdkafka says only that the broker's
    /// certificate did not verify: a handshake of our own under `config`'s TLS settings reads
    /// OpenSSL's verification result ([`tls::verify_failure`]: not signed by a trusted CA, not
    /// for this host name, expired, ...).
    pub fn explained(self, config: &ClientConfig) -> Self {
        match self {
            Rejection::Tls { broker, reason } if reason.contains("certificate verify failed") => {
                let reason = match tls::verify_failure(&broker, config) {
                    Some(cause) => cause,
                    None => reason,
                };
                Rejection::Tls { broker, reason }
            }
            other => other,
        }
    }
}

/// Whether librdkafka's text is about a failed TLS handshake.
fn says_tls(text: &str) -> bool {
    text.contains("SSL handshake failed") || text.contains("SSL routines")
}

/// Splits librdkafka's `proto://host:port/node: cause` into `host:port` and the cause.
fn split_broker(reason: &str) -> Option<(&str, &str)> {
    let (proto, rest) = reason.split_once("://")?;
    if proto.is_empty()
        || !proto
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return None;
    }
    let (name, cause) = rest.split_once(": ")?;
    let (addr, _node) = name.rsplit_once('/')?;
    Some((addr, cause))
}

/// Why a topic is not usable.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The topic does not exist (flowlog never creates topics).
    #[error("Kafka topic `{topic}` does not exist on {brokers}: create it first")]
    Missing { topic: String, brokers: String },
    #[error("Kafka topic `{topic}` on {brokers} is not usable: {error}")]
    Unusable {
        topic: String,
        brokers: String,
        error: String,
    },
    /// The brokers did not answer the metadata request.
    #[error("Kafka brokers {brokers} did not answer for topic `{topic}`")]
    Unreachable {
        topic: String,
        brokers: String,
        source: Box<KafkaError>,
    },
    /// A broker refused the client's TLS handshake or SASL authentication.
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

/// How long one metadata request of [`check_topic`] may wait before the client's errors are
/// looked at again.
const METADATA_SLICE: Duration = Duration::from_secs(1);

/// Reads `topic`'s metadata (with `allow.auto.create.topics=false` set on the client, asking
/// does not create it) and returns its partition count. "Unknown topic" is asked again until
/// `timeout`: a broker may say so briefly while it creates or deletes other topics. If the
/// brokers do not answer and a broker refused the client's TLS handshake or SASL authentication
/// meanwhile (seen by `errors`, to which the client's context passes its error callbacks and
/// log lines: [`ClientErrors::report`], [`ClientErrors::log`]), that is the error, as soon as
/// it is known, its cause found under `config` (the client's configuration,
/// [`Rejection::explained`]). `serve` is called between requests: a consumer must be polled for
/// librdkafka to hand its context the events (`|| {}` for producers, whose events are served
/// by their own thread or poll loop).
pub fn check_topic<C: ClientContext>(
    client: &Client<C>,
    config: &ClientConfig,
    topic: &str,
    timeout: Duration,
    errors: &ClientErrors,
    mut serve: impl FnMut(),
) -> Result<usize, TopicError> {
    let brokers = errors.brokers();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = left.clamp(Duration::from_millis(500), METADATA_SLICE);
        let metadata = match client.fetch_metadata(Some(topic), wait) {
            Ok(metadata) => metadata,
            Err(source) => {
                serve();
                if let Some(rejection) = errors.rejection() {
                    return Err(TopicError::Rejected(rejection.explained(config)));
                }
                if Instant::now() < deadline {
                    continue;
                }
                return Err(TopicError::Unreachable {
                    topic: topic.to_string(),
                    brokers: brokers.to_string(),
                    source: Box::new(source),
                });
            }
        };
        let found = metadata.topics().iter().find(|t| t.name() == topic);
        let error = match found {
            None => Some(RDKafkaErrorCode::UnknownTopicOrPartition),
            Some(t) => t.error().map(RDKafkaErrorCode::from),
        };
        match error {
            None => return Ok(found.map_or(0, |t| t.partitions().len())),
            Some(code) if Instant::now() < deadline => {
                debug!(topic, ?code, "topic not usable yet; asking again");
                std::thread::sleep(Duration::from_millis(250));
            }
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                return Err(TopicError::Missing {
                    topic: topic.to_string(),
                    brokers: brokers.to_string(),
                });
            }
            Some(code) => {
                return Err(TopicError::Unusable {
                    topic: topic.to_string(),
                    brokers: brokers.to_string(),
                    error: code.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_snake_case() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(error_kind(&e), "message_timed_out");
        assert_eq!(error_kind(&KafkaError::Canceled), "other");
    }

    #[test]
    fn options_are_key_value() {
        assert_eq!(
            parse_option(" linger.ms =5"),
            Ok(("linger.ms".to_string(), "5".to_string()))
        );
        assert!(parse_option("linger.ms").is_err());
        assert!(parse_option("=5").is_err());
    }

    /// The build links librdkafka with TLS, and so SASL SCRAM (README: Kafka in production).
    #[test]
    fn librdkafka_is_built_with_tls_and_sasl() {
        let conf = ClientConfig::new().create_native_config().unwrap();
        let features = conf.get("builtin.features").unwrap();
        let features: Vec<&str> = features.split(',').collect();
        for needed in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_oauthbearer",
            "zstd",
        ] {
            assert!(features.contains(&needed), "{needed} not in {features:?}");
        }
    }

    #[test]
    fn rejections_name_the_broker_and_the_cause() {
        let ssl = KafkaError::Global(RDKafkaErrorCode::SSL);
        let r = Rejection::from_error(
            &ssl,
            "ssl://localhost:19093/bootstrap: SSL handshake failed: error:0A000086:SSL \
             routines::certificate verify failed (after 3ms in state SSL_HANDSHAKE)",
            "b:1",
        );
        assert_eq!(
            r.unwrap().to_string(),
            "TLS handshake with Kafka broker localhost:19093 failed: error:0A000086:SSL \
             routines::certificate verify failed (after 3ms in state SSL_HANDSHAKE)"
        );
        let auth = KafkaError::Global(RDKafkaErrorCode::Authentication);
        let r = Rejection::from_error(&auth, "SASL authentication error: no", "b:1,c:2").unwrap();
        assert_eq!(
            r,
            Rejection::Authentication {
                broker: "b:1,c:2".into(),
                reason: "SASL authentication error: no".into()
            }
        );
        let r = Rejection::from_error(&auth, "sasl_ssl://[::1]:9096/1: denied", "x").unwrap();
        assert!(matches!(r, Rejection::Authentication { broker, .. } if broker == "[::1]:9096"));
        let transport = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(Rejection::from_error(&transport, "x", "b"), None);
        // Some handshake failures come as transport errors, with OpenSSL's text.
        let text = "ssl://b:1/bootstrap: error:0A000086:SSL routines::certificate verify failed";
        let r = Rejection::from_error(&transport, text, "b").unwrap();
        assert!(matches!(r, Rejection::Tls { broker, .. } if broker == "b:1"));
        // Log lines: broker failures only.
        let r = Rejection::from_log(
            "FAIL",
            "[thrd:sasl_ssl://b:1/bootstrap]: sasl_ssl://b:1/bootstrap: SASL authentication \
             error: SASL SCRAM authentication \
             failed: broker responded with invalid-proof (after 72ms in state AUTH_REQ)",
            "b",
        )
        .unwrap();
        assert_eq!(
            r.to_string(),
            "SASL authentication with Kafka broker b:1 failed: SASL authentication error: SASL \
             SCRAM authentication failed: broker responded with invalid-proof (after 72ms in \
             state AUTH_REQ) (check sasl.mechanism, sasl.username and sasl.password)"
        );
        assert!(Rejection::from_log("FAIL", text, "b").is_some());
        assert_eq!(Rejection::from_log("SSL", text, "b"), None);
        assert_eq!(
            Rejection::from_log("FAIL", "ssl://b:1/bootstrap: Connection refused", "b"),
            None
        );

        let errors = ClientErrors::new("m", "b:1", "retrying");
        errors.report(&transport, "ssl://b:1/bootstrap: Connection refused");
        assert_eq!(errors.rejection(), None);
        errors.report(&ssl, "ssl://b:1/bootstrap: SSL handshake failed: first");
        errors.report(&ssl, "ssl://b:1/bootstrap: SSL handshake failed: second");
        assert!(errors.rejection().unwrap().to_string().ends_with("first"));
    }
}
