//! librdkafka's mock cluster, for injected broker errors.
//!
//! It accepts transactions but does not hide aborted records from
//! read_committed consumers and does not fence producers: use it to drive
//! error paths, not to prove exactly-once visibility.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// An in-process mock Kafka cluster reachable over loopback TCP.
pub struct MockKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.bootstrap())
            .finish()
    }
}

impl MockKafka {
    /// A cluster of `brokers` brokers.
    ///
    /// # Panics
    /// If librdkafka cannot create it.
    pub fn new(brokers: i32) -> MockKafka {
        MockKafka {
            cluster: MockCluster::new(brokers).expect("mock cluster"),
        }
    }

    /// Bootstrap servers.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The cluster, for error injection.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }

    /// Creates a topic.
    ///
    /// # Panics
    /// If the mock refuses.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.cluster
            .create_topic(name, partitions, 1)
            .expect("mock create_topic");
    }
}
