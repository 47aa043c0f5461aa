//! The `txbox-relay` command line, as a library function so other binaries
//! and tests can embed it.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigOverrides, Mode, OnReject, RelayConfig};
use crate::duration::parse_duration;

/// Publishes committed txbox outbox rows to Kafka, in order per key,
/// exactly once (Kafka transactions) or at least once.
///
/// Every option can also come from an environment variable or the TOML
/// file given with --config. Precedence: flag > environment > file >
/// default.
#[derive(Debug, Clone, Parser)]
#[command(name = "txbox-relay", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file (fields as in the flags, with underscores).
    #[arg(long, env = "TXBOX_RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL of the database holding the outbox.
    #[arg(
        long,
        env = "TXBOX_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Schema of the txbox tables [default: txbox].
    #[arg(long, env = "TXBOX_SCHEMA")]
    pub schema: Option<String>,
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "TXBOX_KAFKA_BOOTSTRAP", value_name = "SERVERS")]
    pub brokers: Option<String>,
    /// Stream ids this process runs, comma-separated [default: 0].
    #[arg(long, env = "TXBOX_STREAMS", value_delimiter = ',', value_name = "IDS")]
    pub streams: Option<Vec<i32>>,
    /// exactly-once (Kafka transactions) or at-least-once [default: exactly-once].
    #[arg(long, env = "TXBOX_RELAY_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// Rows per batch / Kafka transaction [default: 1000].
    #[arg(long, env = "TXBOX_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Idle wait between reads; NOTIFY wakes earlier [default: 200ms].
    #[arg(long, env = "TXBOX_POLL_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    pub poll_interval: Option<Duration>,
    /// LISTEN channel whose payload is a stream id [default: txbox_outbox].
    #[arg(long, env = "TXBOX_NOTIFY_CHANNEL")]
    pub notify_channel: Option<String>,
    /// Stream lease duration without renewal [default: 10s].
    #[arg(long, env = "TXBOX_LEASE_TTL", value_parser = parse_duration, value_name = "DURATION")]
    pub lease_ttl: Option<Duration>,
    /// This process's name as lease owner [default: host:pid:nonce, unique per start].
    #[arg(long, env = "TXBOX_INSTANCE")]
    pub instance: Option<String>,
    /// Prefix of transactional.id = {prefix}-{installation}-{schema}-{stream} [default: txbox-relay].
    #[arg(long, env = "TXBOX_TRANSACTIONAL_ID_PREFIX")]
    pub transactional_id_prefix: Option<String>,
    /// Compacted topic carrying positions in each transaction [default: txbox.relay.positions].
    #[arg(long, env = "TXBOX_POSITION_TOPIC")]
    pub position_topic: Option<String>,
    /// stop, or dead-letter rows Kafka refuses for good [default: stop].
    #[arg(long, env = "TXBOX_ON_REJECT", value_enum)]
    pub on_reject: Option<OnReject>,
    /// Rows deleted per prune statement [default: 1000].
    #[arg(long, env = "TXBOX_PRUNE_BATCH")]
    pub prune_batch: Option<i64>,
    /// Pause between prune rounds [default: 5s].
    #[arg(long, env = "TXBOX_PRUNE_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    pub prune_interval: Option<Duration>,
    /// Warn when a transaction this old holds publishing back [default: 30s].
    #[arg(long, env = "TXBOX_HOLD_BACK_WARN", value_parser = parse_duration, value_name = "DURATION")]
    pub hold_back_warn: Option<Duration>,
    /// Serve GET /metrics (Prometheus), /health and /ready on this address,
    /// e.g. 0.0.0.0:9187 [default: no endpoint].
    #[arg(long, env = "TXBOX_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Extra librdkafka option key=value (repeatable; in the environment
    /// separated by `;`, since values may contain commas).
    #[arg(
        long = "kafka-option",
        env = "TXBOX_KAFKA_OPTIONS",
        value_delimiter = ';',
        value_parser = txbox::kafka::parse_option,
        value_name = "KEY=VALUE",
        hide_env_values = true
    )]
    pub kafka_options: Vec<(String, String)>,
    /// Log lines as text (colours only on a terminal) or json, one object
    /// per line.
    #[arg(long, env = "TXBOX_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: crate::logging::LogFormat,
    /// Export spans over OTLP/HTTP to this OpenTelemetry collector (its
    /// base URL; `/v1/traces` is appended); without it nothing is exported.
    #[cfg(feature = "otlp")]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl Cli {
    /// The flag/environment layer of the configuration.
    pub fn overrides(&self) -> ConfigOverrides {
        ConfigOverrides {
            database_url: self.database_url.clone(),
            schema: self.schema.clone(),
            brokers: self.brokers.clone(),
            streams: self.streams.clone(),
            mode: self.mode,
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            notify_channel: self.notify_channel.clone(),
            lease_ttl: self.lease_ttl,
            instance: self.instance.clone(),
            transactional_id_prefix: self.transactional_id_prefix.clone(),
            position_topic: self.position_topic.clone(),
            on_reject: self.on_reject,
            prune_batch: self.prune_batch,
            prune_interval: self.prune_interval,
            hold_back_warn: self.hold_back_warn,
            metrics_listen: self.metrics_listen,
            kafka: self.kafka_options.clone(),
        }
    }

    /// The effective configuration: these flags and variables over the
    /// file (if any) over the defaults.
    pub fn resolve(&self) -> crate::Result<RelayConfig> {
        let file = self
            .config
            .as_deref()
            .map(RelayConfig::from_file)
            .transpose()?;
        RelayConfig::resolve(file, self.overrides())
    }
}

/// Runs `txbox-relay` with `args` (the first is the program name): parses
/// the command line, sets up logging (`RUST_LOG`, default `info`;
/// `--log-format`), runs
/// until SIGTERM or Ctrl-C, and fails if any stream stopped with an error.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// txbox_relay::cli::main_with_args([
///     "txbox-relay",
///     "--database-url", "postgres://relay@db/app",
///     "--brokers", "kafka:9092",
///     "--mode", "at-least-once",
/// ])
/// .await
/// # }
/// ```
pub async fn main_with_args<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            e.print()?;
            return Ok(());
        }
        Err(e) => return Err(anyhow::anyhow!("{e}")),
    };
    #[cfg(feature = "otlp")]
    let _otlp = crate::logging::init_with_otlp(
        cli.log_format,
        "txbox-relay",
        cli.otlp_endpoint.as_deref(),
    )?;
    #[cfg(not(feature = "otlp"))]
    crate::logging::init(cli.log_format);
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let config = cli.resolve()?;
    tracing::info!(config = ?config, "configuration");
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let report = match config.metrics_listen {
        Some(addr) => {
            let endpoint = txbox::http::Endpoint::new(addr)
                .prometheus()
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            crate::run_serving(config, shutdown, endpoint).await?
        }
        None => crate::run(config, shutdown).await?,
    };
    tracing::info!(
        published = report.published(),
        dead_lettered = report.dead_lettered(),
        "relay stopped"
    );
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C (SIGINT).
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        shutdown.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flag beats environment (clap), environment beats file, file beats
    /// default (`RelayConfig::resolve`). The variable used is unique to
    /// this test.
    #[test]
    fn flag_over_env_over_file_over_default() {
        let dir = std::env::temp_dir().join(format!("txbox-relay-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            "database_url = 'postgres://file/db'\nbrokers = 'file:9092'\nprune_batch = 7\nhold_back_warn = '1m'\nbatch_size = 11",
        )
        .expect("write config");
        std::env::set_var("TXBOX_PRUNE_BATCH", "8");
        std::env::set_var("TXBOX_BATCH_SIZE", "12");
        let cli = Cli::try_parse_from([
            "txbox-relay",
            "--config",
            file.to_str().expect("utf-8 path"),
            "--batch-size",
            "13",
            "--kafka-option",
            "linger.ms=1",
            "--kafka-option",
            "ssl.cipher.suites=A,B",
            "--streams",
            "0,2",
        ])
        .expect("parses");
        std::env::remove_var("TXBOX_PRUNE_BATCH");
        std::env::remove_var("TXBOX_BATCH_SIZE");
        let c = cli.resolve().expect("valid");
        assert_eq!(c.batch_size, 13, "flag beats env and file");
        assert_eq!(c.prune_batch, 8, "env beats file");
        assert_eq!(
            c.hold_back_warn,
            Duration::from_secs(60),
            "file beats default"
        );
        assert_eq!(c.lease_ttl, Duration::from_secs(10), "default");
        assert_eq!(c.streams, vec![0, 2]);
        assert_eq!(c.kafka.get("linger.ms").map(String::as_str), Some("1"));
        assert_eq!(
            c.kafka.get("ssl.cipher.suites").map(String::as_str),
            Some("A,B"),
            "commas stay in values"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_flags_are_clear() {
        let err = Cli::try_parse_from(["txbox-relay", "--mode", "twice"]).expect_err("bad mode");
        assert!(err.to_string().contains("at-least-once"), "{err}");
        let err = Cli::try_parse_from(["txbox-relay", "--lease-ttl", "10"]).expect_err("no unit");
        assert!(err.to_string().contains("with a unit"), "{err}");
        let err = Cli::try_parse_from(["txbox-relay", "--kafka-option", "oops"]).expect_err("no =");
        assert!(err.to_string().contains("key=value"), "{err}");
    }
}
