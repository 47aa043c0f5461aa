//! A real Kafka-protocol broker over TCP for tests: Tansu.
//!
//! Tansu 0.6.0 speaks the Kafka protocol but has no transactions (no
//! EndTxn), no aborted-record filtering, drops offset-commit metadata, does
//! not auto-create topics, and its high watermark can lag. Tests that need
//! those features must use [`crate::real_kafka`] or say what they prove.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::OnceCell;

/// A broker tests can use.
#[derive(Debug)]
pub struct Broker {
    bootstrap: String,
}

static TANSU: OnceCell<Broker> = OnceCell::const_new();

/// The Tansu broker for this test process: the one at `TXBOX_TEST_KAFKA`
/// (started by `scripts/dev-up`), or a new one on a free loopback port that
/// exits when this process does.
///
/// # Panics
/// If no broker is configured and the `tansu` binary cannot be found or
/// does not start.
pub async fn tansu() -> &'static Broker {
    TANSU
        .get_or_init(|| async {
            if let Ok(bootstrap) = std::env::var("TXBOX_TEST_KAFKA") {
                if !bootstrap.is_empty() {
                    return Broker { bootstrap };
                }
            }
            start_tansu().await
        })
        .await
}

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TXBOX_TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = PathBuf::from(home).join(".cargo/bin/tansu");
    if cargo_bin.exists() {
        cargo_bin
    } else {
        PathBuf::from("tansu")
    }
}

async fn start_tansu() -> Broker {
    let port = crate::free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let bin = tansu_binary();
    // A watchdog shell ends the broker when this test process exits, even
    // on a panic or SIGKILL.
    let script = format!(
        "\"$0\" broker --listener-url {url} --advertised-listener-url {url} --storage-engine memory://tansu/ --silent & b=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $b 2>/dev/null; do sleep 1; done; kill $b 2>/dev/null",
        parent = std::process::id()
    );
    let mut watchdog = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&bin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start tansu ({}): {e}; run scripts/dev-up",
                bin.display()
            )
        });
    // Reap the watchdog whenever it exits.
    std::thread::spawn(move || watchdog.wait());
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return Broker { bootstrap: addr };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("tansu did not listen on {addr} within 30 s");
}

impl Broker {
    /// A broker at `bootstrap` (e.g. real Kafka from [`crate::real_kafka`]).
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
        create_topic(&self.bootstrap, name, partitions).await;
    }

    /// Deletes a topic and waits until metadata no longer lists it, so a
    /// topic of the same name can be created anew (Apache Kafka deletes
    /// asynchronously; Tansu 0.6.0 and the mock cluster are not used for
    /// this).
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
}

pub(crate) async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
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
