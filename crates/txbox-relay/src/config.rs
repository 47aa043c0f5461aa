//! The relay's configuration: defaults, the TOML file, and how flags and
//! environment variables override it.
//!
//! Precedence, highest first: command-line flag, environment variable,
//! configuration file, default. Flags and environment variables arrive
//! together as [`ConfigOverrides`] (clap already prefers the flag);
//! [`RelayConfig::resolve`] lays them over the file, which serde has laid
//! over the defaults.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::duration::{self, format_duration};
use crate::error::{Error, Result};

/// How the relay publishes a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One Kafka transaction per batch, carrying the rows and the stream's
    /// new position; a `read_committed` consumer sees each row once. Needs
    /// a broker with transactions (the relay checks at start and refuses
    /// otherwise).
    #[default]
    ExactlyOnce,
    /// An idempotent producer; the position is written to PostgreSQL after
    /// every row is acknowledged. A crash between the two re-publishes at
    /// most one batch, with the same event ids.
    AtLeastOnce,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::ExactlyOnce => "exactly-once",
            Mode::AtLeastOnce => "at-least-once",
        })
    }
}

/// What to do with a row Kafka refuses for good (too large, topic missing
/// and not creatable, not authorized, invalid record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnReject {
    /// Stop the stream with an error naming the row and topic. Nothing is
    /// skipped; the rows behind it wait.
    #[default]
    Stop,
    /// Move the row to `relay_dead_letters` (in one token-checked
    /// transaction with its removal from the outbox) and go on.
    DeadLetter,
}

impl fmt::Display for OnReject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnReject::Stop => "stop",
            OnReject::DeadLetter => "dead-letter",
        })
    }
}

/// Everything the relay needs to run.
///
/// Build one with [`RelayConfig::new`] and adjust fields, or load a TOML
/// file with [`RelayConfig::from_file`]. Every field but `database_url` and
/// `brokers` has a default:
///
/// | field | default | meaning |
/// |---|---|---|
/// | `database_url` | (required) | PostgreSQL holding the outbox |
/// | `schema` | `txbox` | schema of the txbox tables |
/// | `brokers` | (required) | Kafka bootstrap servers |
/// | `streams` | `[0]` | stream ids this process runs |
/// | `mode` | `exactly-once` | or `at-least-once` |
/// | `batch_size` | `1000` | rows per Kafka transaction / batch |
/// | `poll_interval` | `200ms` | idle wait; NOTIFY wakes earlier |
/// | `notify_channel` | `txbox_outbox` | channel the outbox notifies |
/// | `lease_ttl` | `10s` | how long a stream lease lasts unrenewed |
/// | `instance` | `host:pid:nonce`, unique per process start ([`txbox::instance::name`]) | this process's name in `relay_streams.owner` |
/// | `transactional_id_prefix` | `txbox-relay` | `transactional.id` = `{prefix}-{installation}-{schema}-{stream}` |
/// | `position_topic` | `txbox.relay.positions` | compacted topic of positions (exactly-once) |
/// | `on_reject` | `stop` | or `dead-letter` |
/// | `prune_batch` | `1000` | rows (and key order heads) deleted per prune statement |
/// | `prune_interval` | `5s` | pause between prune rounds (none after a round that hit its limit of 100 batches, unless the stream published as many rows since the round before) |
/// | `hold_back_warn` | `30s` | warn when a transaction this old holds the relay back |
/// | `metrics_listen` | (none) | `txbox-relay` serves `/metrics` (Prometheus), `/health` and `/ready` on this address |
/// | `kafka` | `{}` | extra librdkafka options, passed through |
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use txbox_relay::{Mode, RelayConfig};
///
/// let file = RelayConfig::from_toml_str(r#"
///     database_url = "postgres://relay@db/app"
///     brokers = "kafka-1:9092,kafka-2:9092"
///     streams = [0, 1]
///     mode = "at-least-once"
///     poll_interval = "50ms"
///     [kafka]
///     "linger.ms" = 10
/// "#)?;
/// assert_eq!(file.mode, Mode::AtLeastOnce);
/// assert_eq!(file.poll_interval, Duration::from_millis(50));
/// assert_eq!(file.batch_size, 1000); // default
/// assert_eq!(file.kafka["linger.ms"], "10");
/// # Ok::<(), txbox_relay::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// PostgreSQL URL of the database holding the outbox.
    pub database_url: String,
    /// Schema of the txbox tables.
    pub schema: String,
    /// Kafka bootstrap servers (`host:port,...`).
    pub brokers: String,
    /// The stream ids this process runs, each as its own task.
    pub streams: Vec<i32>,
    /// Exactly-once (Kafka transactions) or at-least-once.
    pub mode: Mode,
    /// Rows per batch (one Kafka transaction in exactly-once mode).
    pub batch_size: usize,
    /// How long an idle stream waits before reading again.
    #[serde(deserialize_with = "duration::deserialize")]
    pub poll_interval: Duration,
    /// The LISTEN channel; its payload is a stream id.
    pub notify_channel: String,
    /// How long a stream lease lasts without renewal.
    #[serde(deserialize_with = "duration::deserialize")]
    pub lease_ttl: Duration,
    /// This process's name as lease owner.
    pub instance: String,
    /// Prefix of each stream's Kafka `transactional.id`.
    pub transactional_id_prefix: String,
    /// Compacted topic that carries positions inside each transaction.
    pub position_topic: String,
    /// What to do with a row Kafka refuses for good.
    pub on_reject: OnReject,
    /// Rows (and key order heads) deleted per prune statement.
    pub prune_batch: i64,
    /// Pause between prune rounds; none after a round that deleted its
    /// limit (100 statements of `prune_batch` rows), so a drained backlog
    /// is pruned without waiting, unless the stream published as many
    /// rows since the round before (it is still draining a backlog:
    /// publishing comes first).
    #[serde(deserialize_with = "duration::deserialize")]
    pub prune_interval: Duration,
    /// Age of a running transaction at which the relay warns that it is
    /// held back.
    #[serde(deserialize_with = "duration::deserialize")]
    pub hold_back_warn: Duration,
    /// Where the `txbox-relay` binary serves its metrics for Prometheus
    /// (`GET /metrics`), with `/health` and `/ready` for probes, e.g.
    /// `0.0.0.0:9187`. Unset: no endpoint.
    /// [`run`](crate::run) itself installs nothing: a program embedding the
    /// relay installs its own `metrics` recorder.
    pub metrics_listen: Option<SocketAddr>,
    /// Extra librdkafka options (`security.protocol`, `sasl.*`, ...). They
    /// override the relay's own settings except the ones its guarantees rest
    /// on (`transactional.id`, `enable.idempotence`, `acks`,
    /// `isolation.level`).
    #[serde(deserialize_with = "deserialize_kafka_options")]
    pub kafka: BTreeMap<String, String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            database_url: String::new(),
            schema: txbox::Schema::DEFAULT.to_owned(),
            brokers: String::new(),
            streams: vec![0],
            mode: Mode::ExactlyOnce,
            batch_size: 1000,
            poll_interval: Duration::from_millis(200),
            notify_channel: txbox::outbox::DEFAULT_NOTIFY_CHANNEL.to_owned(),
            lease_ttl: Duration::from_secs(10),
            instance: txbox::instance::name().to_owned(),
            transactional_id_prefix: "txbox-relay".to_owned(),
            position_topic: "txbox.relay.positions".to_owned(),
            on_reject: OnReject::Stop,
            prune_batch: 1000,
            prune_interval: Duration::from_secs(5),
            hold_back_warn: Duration::from_secs(30),
            metrics_listen: None,
            kafka: BTreeMap::new(),
        }
    }
}

/// Values from the command line and environment, each `None` when unset.
///
/// [`RelayConfig::resolve`] applies every `Some` over the file's values.
/// `kafka` entries are merged key by key over the file's `[kafka]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // each field overrides the `RelayConfig` field of the same name
pub struct ConfigOverrides {
    pub database_url: Option<String>,
    pub schema: Option<String>,
    pub brokers: Option<String>,
    pub streams: Option<Vec<i32>>,
    pub mode: Option<Mode>,
    pub batch_size: Option<usize>,
    pub poll_interval: Option<Duration>,
    pub notify_channel: Option<String>,
    pub lease_ttl: Option<Duration>,
    pub instance: Option<String>,
    pub transactional_id_prefix: Option<String>,
    pub position_topic: Option<String>,
    pub on_reject: Option<OnReject>,
    pub prune_batch: Option<i64>,
    pub prune_interval: Option<Duration>,
    pub hold_back_warn: Option<Duration>,
    pub metrics_listen: Option<SocketAddr>,
    pub kafka: Vec<(String, String)>,
}

impl RelayConfig {
    /// Defaults, with the two required values.
    pub fn new(database_url: impl Into<String>, brokers: impl Into<String>) -> Self {
        RelayConfig {
            database_url: database_url.into(),
            brokers: brokers.into(),
            ..RelayConfig::default()
        }
    }

    /// Parses a TOML document (unset fields keep their defaults; unknown
    /// fields are an error, so a typo does not silently fall back).
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: "<string>".to_owned(),
            reason: e.to_string(),
        })
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// The one merge: `overrides` (flags, then environment) over `file`
    /// (or the defaults), then [`validate`](Self::validate).
    ///
    /// # Examples
    ///
    /// ```
    /// use txbox_relay::{ConfigOverrides, Mode, RelayConfig};
    ///
    /// let file = RelayConfig::from_toml_str(
    ///     "database_url = 'postgres://db/app'\nbrokers = 'k:9092'\nbatch_size = 500",
    /// )?;
    /// let cli = ConfigOverrides { mode: Some(Mode::AtLeastOnce), ..Default::default() };
    /// let config = RelayConfig::resolve(Some(file), cli)?;
    /// assert_eq!(config.batch_size, 500);          // from the file
    /// assert_eq!(config.mode, Mode::AtLeastOnce); // from the command line
    /// # Ok::<(), txbox_relay::Error>(())
    /// ```
    pub fn resolve(file: Option<RelayConfig>, overrides: ConfigOverrides) -> Result<Self> {
        let mut c = file.unwrap_or_default();
        let o = overrides;
        macro_rules! take {
            ($($field:ident),*) => {$(
                if let Some(v) = o.$field { c.$field = v; }
            )*};
        }
        take!(
            database_url,
            schema,
            brokers,
            streams,
            mode,
            batch_size,
            poll_interval,
            notify_channel,
            lease_ttl,
            instance,
            transactional_id_prefix,
            position_topic,
            on_reject,
            prune_batch,
            prune_interval,
            hold_back_warn
        );
        if o.metrics_listen.is_some() {
            c.metrics_listen = o.metrics_listen;
        }
        for (k, v) in o.kafka {
            c.kafka.insert(k, v);
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks every value; the error names the field and how to set it.
    pub fn validate(&self) -> Result<()> {
        if self.database_url.trim().is_empty() {
            return Err(Error::config(
                "database_url is required (--database-url, TXBOX_DATABASE_URL or `database_url` in the config file)",
            ));
        }
        if self.brokers.trim().is_empty() {
            return Err(Error::config(
                "brokers is required (--brokers, TXBOX_KAFKA_BOOTSTRAP or `brokers` in the config file)",
            ));
        }
        txbox::Schema::new(self.schema.clone())
            .map_err(|e| Error::config(format!("schema: {e}")))?;
        if self.streams.is_empty() {
            return Err(Error::config("streams must name at least one stream id"));
        }
        let mut seen = self.streams.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != self.streams.len() {
            return Err(Error::config(format!(
                "streams {:?} lists a stream twice",
                self.streams
            )));
        }
        if let Some(s) = self.streams.iter().find(|s| **s < 0) {
            return Err(Error::config(format!("stream id {s} must not be negative")));
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return Err(Error::config(format!(
                "batch_size {} must be between 1 and 100000",
                self.batch_size
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::config("poll_interval must be more than 0"));
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(Error::config(format!(
                "lease_ttl {} must be at least 1s",
                format_duration(self.lease_ttl)
            )));
        }
        if self.prune_batch < 1 {
            return Err(Error::config("prune_batch must be at least 1"));
        }
        if self.prune_interval.is_zero() {
            return Err(Error::config("prune_interval must be more than 0"));
        }
        for (name, value) in [
            ("notify_channel", &self.notify_channel),
            ("instance", &self.instance),
            ("transactional_id_prefix", &self.transactional_id_prefix),
            ("position_topic", &self.position_topic),
        ] {
            if value.trim().is_empty() {
                return Err(Error::config(format!("{name} must not be empty")));
            }
        }
        if !valid_topic(&self.position_topic) {
            return Err(Error::config(format!(
                "position_topic {:?} is not a valid Kafka topic name ([a-zA-Z0-9._-], at most 249)",
                self.position_topic
            )));
        }
        for key in self.kafka.keys() {
            if PROTECTED_KAFKA_OPTIONS.contains(&key.as_str()) {
                return Err(Error::config(format!(
                    "kafka option {key:?} is set by the relay (its guarantees depend on it) and cannot be overridden"
                )));
            }
        }
        Ok(())
    }

    /// The txbox schema as a quoted-name value.
    pub fn txbox_schema(&self) -> Result<txbox::Schema> {
        txbox::Schema::new(self.schema.clone()).map_err(|e| Error::config(format!("schema: {e}")))
    }
}

/// librdkafka options the relay sets itself and will not take from users.
pub(crate) const PROTECTED_KAFKA_OPTIONS: &[&str] = &[
    "transactional.id",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "isolation.level",
];

fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Accepts TOML strings, integers, floats and booleans as option values.
fn deserialize_kafka_options<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::Text(s) => s,
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Bool(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

impl fmt::Debug for RelayConfig {
    /// Like a derived `Debug`, with secrets (the database password and
    /// Kafka options named `*password*`, `*secret*`) replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kafka: BTreeMap<&str, &str> = self
            .kafka
            .iter()
            .map(|(k, v)| {
                let secret = k.contains("password") || k.contains("secret");
                (k.as_str(), if secret { "***" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("RelayConfig")
            .field("database_url", &txbox::db::redact_url(&self.database_url))
            .field("schema", &self.schema)
            .field("brokers", &self.brokers)
            .field("streams", &self.streams)
            .field("mode", &self.mode)
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .field("notify_channel", &self.notify_channel)
            .field("lease_ttl", &self.lease_ttl)
            .field("instance", &self.instance)
            .field("transactional_id_prefix", &self.transactional_id_prefix)
            .field("position_topic", &self.position_topic)
            .field("on_reject", &self.on_reject)
            .field("prune_batch", &self.prune_batch)
            .field("prune_interval", &self.prune_interval)
            .field("hold_back_warn", &self.hold_back_warn)
            .field("metrics_listen", &self.metrics_listen)
            .field("kafka", &kafka)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> RelayConfig {
        RelayConfig::from_toml_str(
            r#"
            database_url = "postgres://file@db/app"
            brokers = "file:9092"
            batch_size = 250
            lease_ttl = "4s"
            [kafka]
            "linger.ms" = 5
            "client.id" = "from-file"
            "#,
        )
        .expect("valid file")
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = RelayConfig::new("postgres://db", "k:9092");
        assert_eq!(c.schema, "txbox");
        assert_eq!(c.streams, vec![0]);
        assert_eq!(c.mode, Mode::ExactlyOnce);
        assert_eq!(c.batch_size, 1000);
        assert_eq!(c.poll_interval, Duration::from_millis(200));
        assert_eq!(c.notify_channel, "txbox_outbox");
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert!(c.instance.contains(&format!(":{}:", std::process::id())));
        assert_eq!(
            c.instance,
            RelayConfig::new("postgres://db", "k:9092").instance,
            "one name per process"
        );
        assert_eq!(c.transactional_id_prefix, "txbox-relay");
        assert_eq!(c.position_topic, "txbox.relay.positions");
        assert_eq!(c.on_reject, OnReject::Stop);
        assert_eq!(c.prune_batch, 1000);
        assert_eq!(c.prune_interval, Duration::from_secs(5));
        assert_eq!(c.hold_back_warn, Duration::from_secs(30));
        assert!(c.kafka.is_empty());
        c.validate().expect("defaults validate");
    }

    #[test]
    fn override_beats_file_beats_default() {
        let o = ConfigOverrides {
            brokers: Some("flag:9092".into()),
            lease_ttl: Some(Duration::from_secs(2)),
            kafka: vec![("client.id".into(), "from-flag".into())],
            ..Default::default()
        };
        let c = RelayConfig::resolve(Some(file()), o).expect("valid");
        assert_eq!(c.brokers, "flag:9092"); // override
        assert_eq!(c.database_url, "postgres://file@db/app"); // file
        assert_eq!(c.batch_size, 250); // file
        assert_eq!(c.lease_ttl, Duration::from_secs(2)); // override over file
        assert_eq!(c.poll_interval, Duration::from_millis(200)); // default
        assert_eq!(c.kafka["client.id"], "from-flag");
        assert_eq!(c.kafka["linger.ms"], "5");
    }

    #[test]
    fn no_file_uses_defaults() {
        let o = ConfigOverrides {
            database_url: Some("postgres://x".into()),
            brokers: Some("k:1".into()),
            ..Default::default()
        };
        let c = RelayConfig::resolve(None, o).expect("valid");
        assert_eq!(c.batch_size, 1000);
    }

    #[test]
    fn bad_values_give_clear_errors() {
        let err = RelayConfig::resolve(None, ConfigOverrides::default())
            .expect_err("missing url")
            .to_string();
        assert!(err.contains("database_url is required"), "{err}");

        let err = RelayConfig::from_toml_str("batch_sise = 3").expect_err("typo");
        assert!(
            err.to_string().contains("unknown field `batch_sise`"),
            "{err}"
        );

        let err = RelayConfig::from_toml_str("poll_interval = \"fast\"").expect_err("bad");
        assert!(err.to_string().contains("with a unit"), "{err}");

        let err = RelayConfig::from_toml_str("mode = \"sometimes\"").expect_err("bad mode");
        assert!(err.to_string().contains("exactly-once"), "{err}");

        let mut c = RelayConfig::new("postgres://x", "k:1");
        c.batch_size = 0;
        assert!(c
            .validate()
            .expect_err("zero")
            .to_string()
            .contains("batch_size"));
        c.batch_size = 10;
        c.streams = vec![1, 1];
        assert!(c.validate().expect_err("dup").to_string().contains("twice"));
        c.streams = vec![0];
        c.kafka.insert("enable.idempotence".into(), "false".into());
        assert!(c
            .validate()
            .expect_err("protected")
            .to_string()
            .contains("cannot be overridden"));
    }

    #[test]
    fn debug_hides_secrets() {
        let mut c = RelayConfig::new("postgres://relay:hunter2@db/app", "k:1");
        c.kafka.insert("sasl.password".into(), "hunter3".into());
        let text = format!("{c:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("hunter3"),
            "{text}"
        );
        assert!(text.contains("postgres://relay:***@db/app"), "{text}");
    }
}
