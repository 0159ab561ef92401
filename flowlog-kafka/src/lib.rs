//! Kafka client plumbing that the agent (`flowlog-sidecar`) and the enricher share: the
//! snake_case kind of a librdkafka error (a metric label), the start-up check that a topic
//! exists, and [`throttle::LogThrottle`] for warnings that would otherwise repeat per event.
use std::time::{Duration, Instant};

use rdkafka::{
    client::{Client, ClientContext},
    error::{KafkaError, RDKafkaErrorCode},
};
use tracing::debug;

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
