//! The Apache Kafka broker tests share, and what they do with it.
//!
//! Every broker test runs against real Apache Kafka: transactions,
//! `read_committed`, producer fencing, group coordination and topic
//! deletion are the real thing. `scripts/dev-up` (and so `scripts/test`)
//! starts one broker and exports its address as `KAFKA_BOOTSTRAP`; without
//! it, the first call to [`kafka`] in a test process starts a private
//! broker ([`KafkaServer`]) that ends with the process.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::OnceCell;

use crate::KafkaServer;

/// A broker tests can use.
#[derive(Debug)]
pub struct Broker {
    bootstrap: String,
}

struct Shared {
    broker: Broker,
    /// The private broker, when this process started one; kept for the
    /// process's lifetime (its watchdog ends it with the process).
    _server: Option<KafkaServer>,
}

static SHARED: OnceCell<Shared> = OnceCell::const_new();

/// The Apache Kafka broker for this test process: the one at
/// `KAFKA_BOOTSTRAP` (started by `scripts/dev-up`), or a private one
/// started on first use that ends when this process does.
///
/// Tests share it: each uses topics, groups and transactional ids of its
/// own ([`crate::unique_name`]). A test that stops or kills the broker
/// starts a [`KafkaServer`] of its own instead.
///
/// # Panics
/// If no broker is configured and none can be started (no Java, no Maven
/// and no `KAFKA_HOME`: the message says what to install).
pub async fn kafka() -> &'static Broker {
    let shared = SHARED
        .get_or_init(|| async {
            match std::env::var("KAFKA_BOOTSTRAP") {
                Ok(bootstrap) if !bootstrap.is_empty() => Shared {
                    broker: Broker { bootstrap },
                    _server: None,
                },
                _ => {
                    let server = KafkaServer::start().await;
                    Shared {
                        broker: server.broker(),
                        _server: Some(server),
                    }
                }
            }
        })
        .await;
    &shared.broker
}

impl Broker {
    /// A broker at `bootstrap`.
    pub fn at(bootstrap: impl Into<String>) -> Broker {
        Broker {
            bootstrap: bootstrap.into(),
        }
    }

    /// Bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic (no-op if it exists).
    ///
    /// # Panics
    /// If the broker refuses.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        create_topic(&self.bootstrap, name, partitions, &[]).await;
    }

    /// Deletes a topic and waits until metadata no longer lists it, so a
    /// topic of the same name can be created anew (Kafka deletes
    /// asynchronously).
    ///
    /// # Panics
    /// If the broker refuses, or still lists the topic after 60 s.
    pub async fn delete_topic(&self, name: &str) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin client");
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in admin
            .delete_topics(&[name], &opts)
            .await
            .expect("delete_topics request")
        {
            if let Err((t, e)) = r {
                panic!("cannot delete topic {t}: {e}");
            }
        }
        let (bootstrap, name) = (self.bootstrap.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            let probe: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .expect("metadata client");
            for _ in 0..600 {
                let listed = probe
                    .fetch_metadata(Some(&name), Duration::from_secs(5))
                    .map(|m| {
                        m.topics()
                            .iter()
                            .any(|t| t.name() == name && t.error().is_none())
                    })
                    .unwrap_or(true);
                if !listed {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("topic {name} still listed 60 s after deletion");
        })
        .await
        .expect("metadata probe");
    }

    /// A fresh uniquely named topic with `partitions` partitions.
    pub async fn topic(&self, prefix: &str, partitions: i32) -> String {
        let name = crate::unique_name(prefix);
        self.create_topic(&name, partitions).await;
        name
    }

    /// A fresh uniquely named topic with `partitions` partitions and these
    /// topic configs (`("max.message.bytes", "2000")`, ...).
    ///
    /// # Panics
    /// If the broker refuses the topic or a config.
    pub async fn topic_with_configs(
        &self,
        prefix: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> String {
        let name = crate::unique_name(prefix);
        create_topic(&self.bootstrap, &name, partitions, configs).await;
        name
    }
}

pub(crate) async fn create_topic(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let topic = configs.iter().fold(
        NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
        |topic, (key, value)| topic.set(key, value),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .expect("create_topics request");
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("cannot create topic {t}: {e}"),
        }
    }
    // Wait until metadata shows every partition with a leader.
    let bootstrap = bootstrap.to_owned();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("metadata client");
        let want = usize::try_from(partitions).unwrap_or(0);
        for _ in 0..100 {
            let ok = probe
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .first()
                        .map(|t| t.error().is_none() && t.partitions().len() == want)
                })
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("topic {name} did not appear in metadata");
    })
    .await
    .expect("metadata wait");
}
