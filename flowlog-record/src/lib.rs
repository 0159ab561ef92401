//! flowlog's flow record and its wire encodings, in a crate of their own so that the agent
//! (`flowlog-sidecar`, which produces records) and the enricher (which consumes them) share one
//! definition without either depending on the other.
//!
//! [`record`] is the record itself (its serde names are the JSON-lines interface); [`avro`] is
//! the Avro codec for Kafka: Confluent-framed datums of `schemas/flow_record.v1.avsc` and the
//! message key. [`enriched`] is the record with both ends attributed, as the enricher writes it.
pub mod avro;
pub mod enriched;
pub mod record;

pub use enriched::{Attribution, Endpoint, EnrichedFlow, Identity, IdentityKind, Workload};
pub use record::{Direction, Family, FlowRecord, Outcome};
