//! Kafka client plumbing that the agent (`flowlog-sidecar`) and the enricher share: the
//! snake_case kind of a librdkafka error (a metric label), the start-up check that a topic
//! exists, and [`throttle::LogThrottle`] for warnings that would otherwise repeat per event.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use rdkafka::{
    client::{Client, ClientContext},
    config::RDKafkaLogLevel,
    error::{KafkaError, RDKafkaErrorCode},
};
use tracing::{debug, error, warn};

pub mod throttle;

pub use throttle::LogThrottle;

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
/// client context's `error` callback (librdkafka's threads) and the owner's own checks.
#[derive(Debug)]
pub struct ClientErrors {
    /// Counter name, labelled `kind`.
    metric: &'static str,
    brokers: String,
    /// What the process does meanwhile, appended to the warning ("retrying", ...).
    meanwhile: &'static str,
    throttle: Mutex<LogThrottle>,
}

impl ClientErrors {
    pub fn new(metric: &'static str, brokers: impl Into<String>, meanwhile: &'static str) -> Self {
        Self {
            metric,
            brokers: brokers.into(),
            meanwhile,
            throttle: Mutex::new(LogThrottle::default()),
        }
    }

    /// For `ClientContext::error`: counts `error` by kind and logs it when due.
    pub fn report(&self, error: &KafkaError, reason: &str) {
        self.note(&error_kind(error), reason);
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
}

/// Reads `topic`'s metadata (with `allow.auto.create.topics=false` set on the client, asking
/// does not create it) and returns its partition count. "Unknown topic" is asked again until
/// `timeout`: a broker may say so briefly while it creates or deletes other topics.
pub fn check_topic<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    brokers: &str,
    timeout: Duration,
) -> Result<usize, TopicError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let metadata = client
            .fetch_metadata(Some(topic), left.max(Duration::from_millis(500)))
            .map_err(|source| TopicError::Unreachable {
                topic: topic.to_string(),
                brokers: brokers.to_string(),
                source: Box::new(source),
            })?;
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
}
