//! Human-readable durations in configuration: `200ms`, `10s`, `1.5m`, `1h`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `<number><unit>` with unit `ms`, `s`, `m` or `h` (a decimal
/// number is allowed, whitespace around the parts is ignored).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use txbox_relay::parse_duration;
///
/// assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
/// assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert!(parse_duration("10").is_err()); // the unit is required
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let usage = || {
        format!("duration {text:?} must be a number with a unit (ms, s, m or h), e.g. \"200ms\"")
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(usage)?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| usage())?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(usage()),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("duration {text:?}: {e}"))
}

/// Formats a duration the way [`parse_duration`] reads it.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Serde helper: a duration written as a string like `"10s"`.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_rejects_garbage() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0.5ms"), Ok(Duration::from_micros(500)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e99h").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for d in [Duration::from_millis(200), Duration::from_secs(10)] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
