//! Kafka client settings given as text, as txbox's command-line tools and
//! configuration files take them.

use crate::error::{Error, Result};

/// Parses one librdkafka option written `key=value` (the first `=` splits;
/// the value may hold more). Key and value are trimmed; an empty key is an
/// error.
///
/// # Examples
///
/// ```
/// use txbox::kafka::parse_option;
///
/// assert_eq!(parse_option("linger.ms = 5")?, ("linger.ms".into(), "5".into()));
/// assert_eq!(parse_option("sasl.jaas=a=b")?.1, "a=b");
/// assert!(parse_option("nonsense").is_err());
/// # Ok::<(), txbox::Error>(())
/// ```
pub fn parse_option(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(Error::config(format!(
            "kafka option {text:?} must look like key=value"
        ))),
    }
}
