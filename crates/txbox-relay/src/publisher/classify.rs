//! Sorting Kafka errors into what the relay does about them.

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode as Code;

/// What an error means for the batch in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Try the same rows again after a pause (broker away, timeout,
    /// coordinator moving, leader election).
    Retriable,
    /// The transaction must be aborted; then the batch is retried.
    Abortable,
    /// The producer is unusable: fenced by a newer instance with the same
    /// `transactional.id`, or a fatal idempotence error. Drop it and go
    /// back to lease acquisition.
    Fatal,
    /// This record will never be accepted as it is (too large, topic
    /// missing and not creatable, not authorized, invalid).
    Permanent,
    /// The broker lacks a feature the mode needs (transactions).
    Unsupported,
}

/// Error codes that no retry fixes for this record.
const PERMANENT: &[Code] = &[
    Code::MessageSizeTooLarge,
    Code::InvalidMessageSize,
    Code::MessageBatchTooLarge,
    Code::TopicAuthorizationFailed,
    Code::UnknownTopic,
    Code::UnknownTopicOrPartition,
    Code::UnknownPartition,
    Code::InvalidTopic,
    Code::InvalidRecord,
    Code::InvalidTimestamp,
    Code::PolicyViolation,
    Code::UnsupportedForMessageFormat,
    Code::InvalidRequiredAcks,
];

/// Error codes after which this producer cannot go on.
const FATAL: &[Code] = &[
    Code::ProducerFenced,
    Code::InvalidProducerEpoch,
    Code::TransactionalIdAuthorizationFailed,
    Code::ClusterAuthorizationFailed,
    Code::Fatal,
    Code::Fenced,
];

/// Codes meaning the broker does not implement what was asked.
const UNSUPPORTED: &[Code] = &[Code::UnsupportedFeature, Code::UnsupportedVersion];

pub(crate) fn classify(err: &KafkaError) -> Class {
    if let KafkaError::Transaction(e) = err {
        if UNSUPPORTED.contains(&e.code()) {
            return Class::Unsupported;
        }
        // librdkafka's own verdict on transaction errors comes first:
        // e.g. UNKNOWN_PRODUCER_ID on EndTxn is abortable, not fatal.
        if e.is_fatal() {
            return Class::Fatal;
        }
        if e.txn_requires_abort() {
            return Class::Abortable;
        }
        if e.is_retriable() {
            return Class::Retriable;
        }
        return by_code(e.code());
    }
    match err.rdkafka_error_code() {
        Some(code) => by_code(code),
        None => Class::Retriable,
    }
}

fn by_code(code: Code) -> Class {
    if FATAL.contains(&code) {
        Class::Fatal
    } else if PERMANENT.contains(&code) {
        Class::Permanent
    } else if UNSUPPORTED.contains(&code) {
        Class::Unsupported
    } else {
        Class::Retriable
    }
}

/// A one-line description: the error code's name, and for transaction
/// errors the flags librdkafka attached.
pub(crate) fn describe(err: &KafkaError) -> String {
    match err {
        KafkaError::Transaction(e) => format!(
            "{} ({:?}; fatal={}, retriable={}, requires_abort={})",
            e.string(),
            e.code(),
            e.is_fatal(),
            e.is_retriable(),
            e.txn_requires_abort()
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_actions() {
        let produce = |c| KafkaError::MessageProduction(c);
        assert_eq!(
            classify(&produce(Code::MessageSizeTooLarge)),
            Class::Permanent
        );
        assert_eq!(
            classify(&produce(Code::TopicAuthorizationFailed)),
            Class::Permanent
        );
        assert_eq!(classify(&produce(Code::UnknownTopic)), Class::Permanent);
        assert_eq!(classify(&produce(Code::MessageTimedOut)), Class::Retriable);
        assert_eq!(
            classify(&produce(Code::BrokerTransportFailure)),
            Class::Retriable
        );
        assert_eq!(classify(&produce(Code::NotCoordinator)), Class::Retriable);
        assert_eq!(classify(&produce(Code::ProducerFenced)), Class::Fatal);
        assert_eq!(classify(&produce(Code::InvalidProducerEpoch)), Class::Fatal);
        assert_eq!(classify(&KafkaError::Canceled), Class::Retriable);
    }
}
