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
    /// Extra librdkafka option for the service's consumer, key=value
    /// (repeatable), e.g. `session.timeout.ms=6000` for a faster takeover
    /// of a killed instance's partitions.
    #[arg(
        long = "kafka-option",
        value_parser = txbox::kafka::parse_option,
        value_name = "KEY=VALUE"
    )]
    pub kafka_options: Vec<(String, String)>,
    /// Log lines (to stderr) as text (colours only on a terminal) or json,
    /// one object per line.
    #[arg(long, env = "TXBOX_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Export spans over OTLP/HTTP to this OpenTelemetry collector (its
    /// base URL; `/v1/traces` is appended). Built with `--features otlp`.
    #[cfg(feature = "otlp")]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl Common {
    /// `builder` with the `--kafka-option`s.
    pub fn with_kafka_options(
        &self,
        builder: txbox::inbox::InboxBuilder,
    ) -> txbox::inbox::InboxBuilder {
        self.kafka_options
            .iter()
            .fold(builder, |b, (k, v)| b.kafka_option(k, v))
    }

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

    /// Installs the log subscriber (stderr, `RUST_LOG`, default `info`)
    /// and, built with the `otlp` feature and given `--otlp-endpoint`, the
    /// span export as `service`. Keep what it returns until the process
    /// ends: dropping it flushes the spans not yet sent.
    pub fn init_logging(&self, service: &str) -> Result<Telemetry> {
        #[cfg(feature = "otlp")]
        {
            txbox_relay::logging::init_with_otlp(
                self.log_format,
                service,
                self.otlp_endpoint.as_deref(),
            )
            .map(|guard| Telemetry { _guard: guard })
            .map_err(|e| Error::Config(e.to_string()))
        }
        #[cfg(not(feature = "otlp"))]
        {
            let _ = service;
            txbox_relay::logging::init(self.log_format);
            Ok(Telemetry {})
        }
    }
}

/// The span export's guard (nothing without the `otlp` feature).
#[derive(Debug)]
#[must_use = "dropping it stops the span export"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    _guard: Option<txbox::trace::otlp::OtlpGuard>,
}
