//! The options both services take, under the same flags and environment
//! variables.

use crate::error::{Error, Result};

pub use txbox_relay::logging::LogFormat;

/// Connection, topic and log options of `payments-example` and
/// `ledger-example` (flattened into each binary's options).
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// PostgreSQL URL of the service's database.
    #[arg(
        long,
        env = "TXBOX_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "TXBOX_KAFKA_BOOTSTRAP", value_name = "SERVERS")]
    pub brokers: Option<String>,
    /// Prepended to the topic names, so that runs do not share topics.
    #[arg(long, env = "TXBOX_DEMO_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
    /// Log lines (to stderr) as text (colours only on a terminal) or json,
    /// one object per line.
    #[arg(long, env = "TXBOX_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl Common {
    /// `name` with the topic prefix.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix)
    }

    /// The brokers, which every mode but a database check needs.
    pub fn brokers(&self) -> Result<&str> {
        self.brokers
            .as_deref()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| {
                Error::Config(
                    "Kafka brokers are required: --brokers or TXBOX_KAFKA_BOOTSTRAP".into(),
                )
            })
    }

    /// Installs the log subscriber (stderr, `RUST_LOG`, default `info`).
    pub fn init_logging(&self) {
        txbox_relay::logging::init(self.log_format);
    }
}
