//! Bounded exponential backoff with jitter.

use std::time::Duration;

use rand::Rng;

/// Bounded exponential backoff with "equal jitter": attempt `n` waits a
/// random time between half and all of `min(initial * factor^(n-1), max)`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use txbox::db::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// let d = b.delay(3); // nominal 400 ms
/// assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Upper bound on any delay.
    pub max: Duration,
    /// Growth per attempt.
    pub factor: f64,
}

impl Backoff {
    /// Doubling backoff from `initial` up to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            factor: 2.0,
        }
    }

    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.factor.powi(attempt.saturating_sub(1).min(64) as i32);
        let nominal = self.initial.as_secs_f64() * exp;
        let capped = nominal.min(self.max.as_secs_f64()).max(0.0);
        let jittered = rand::thread_rng().gen_range(capped / 2.0..=capped);
        Duration::from_secs_f64(jittered)
    }
}

impl Default for Backoff {
    /// 100 ms doubling to 30 s.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}
