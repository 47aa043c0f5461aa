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

/// Codes meaning a producer was fenced by a newer one with its
/// `transactional.id`.
const FENCED: &[Code] = &[
    Code::ProducerFenced,
    Code::InvalidProducerEpoch,
    Code::Fenced,
];

/// Codes meaning a request or a message ran out of time.
const TIMEOUT: &[Code] = &[
    Code::OperationTimedOut,
    Code::RequestTimedOut,
    Code::TimedOutQueue,
    Code::MessageTimedOut,
];

fn code(err: &KafkaError) -> Option<Code> {
    match err {
        KafkaError::Transaction(e) => Some(e.code()),
        other => other.rdkafka_error_code(),
    }
}

/// A timeout: of a request, of a queued message, of a blocking call.
pub(crate) fn is_timeout(err: &KafkaError) -> bool {
    code(err).is_some_and(|c| TIMEOUT.contains(&c))
}

/// Why a transaction ended without a commit after `err`: the `reason`
/// label of `txbox_relay_aborts_total`. `fenced`: a newer producer took
/// the `transactional.id` (its `init_transactions` aborts the
/// transaction); `fatal`: another error that leaves the producer unusable;
/// `timeout`; `abortable`: librdkafka requires an abort; `rejected`: a
/// record will never be accepted; `other`: any other error.
pub(crate) fn abort_reason(err: &KafkaError) -> &'static str {
    match classify(err) {
        Class::Fatal if code(err).is_some_and(|c| FENCED.contains(&c)) => "fenced",
        Class::Fatal => "fatal",
        _ if is_timeout(err) => "timeout",
        Class::Abortable => "abortable",
        Class::Permanent => "rejected",
        Class::Retriable | Class::Unsupported => "other",
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

    #[test]
    fn abort_reasons_name_the_class() {
        let produce = |c| KafkaError::MessageProduction(c);
        assert_eq!(abort_reason(&produce(Code::ProducerFenced)), "fenced");
        assert_eq!(abort_reason(&produce(Code::InvalidProducerEpoch)), "fenced");
        assert_eq!(
            abort_reason(&produce(Code::ClusterAuthorizationFailed)),
            "fatal"
        );
        assert_eq!(abort_reason(&produce(Code::MessageTimedOut)), "timeout");
        assert_eq!(abort_reason(&produce(Code::RequestTimedOut)), "timeout");
        assert_eq!(
            abort_reason(&produce(Code::MessageSizeTooLarge)),
            "rejected"
        );
        assert_eq!(abort_reason(&produce(Code::NotCoordinator)), "other");
        assert_eq!(abort_reason(&KafkaError::Canceled), "other");
    }
}
