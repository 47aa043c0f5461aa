//! Counters and histograms a test process recorded through the `metrics`
//! facade, for asserting what the inbox (or any library in the process)
//! counted and measured.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// The process's metrics recorder, keeping every counter in memory.
///
/// It is global: it counts what every test of the process records, so a
/// test that asserts a count should be alone in its test binary (or
/// compare counts taken before and after). Gauges are discarded.
#[derive(Debug, Default)]
pub struct CapturedMetrics {
    counters: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Key, Arc<Samples>>>,
}

/// A histogram's recorded values.
#[derive(Debug, Default)]
struct Samples(Mutex<Vec<f64>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(value);
    }
}

static CAPTURED: OnceLock<&'static CapturedMetrics> = OnceLock::new();

impl CapturedMetrics {
    /// Installs the capture as the process's global recorder on first call
    /// and returns it (later calls return the same one). Install it before
    /// the code under test runs: counts recorded earlier went nowhere.
    ///
    /// # Panics
    /// If another global recorder was installed first.
    pub fn install() -> &'static CapturedMetrics {
        CAPTURED.get_or_init(|| {
            let captured: &'static CapturedMetrics = Box::leak(Box::default());
            metrics::set_global_recorder(captured)
                .expect("no other global metrics recorder is installed");
            captured
        })
    }

    /// The counter `name`, summed over all its label sets (0 if never
    /// incremented).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters()
            .iter()
            .filter(|(k, _)| k.name() == name)
            .map(|(_, v)| v.load(Ordering::Relaxed))
            .sum()
    }

    /// Every value recorded into the histogram `name`, over all its label
    /// sets (empty if none was).
    pub fn histogram(&self, name: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(k, _)| k.name() == name)
            .flat_map(|(_, s)| s.0.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .collect()
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<AtomicU64>>> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Recorder for CapturedMetrics {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let cell = self.counters().entry(key.clone()).or_default().clone();
        Counter::from_arc(cell)
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let samples = self
            .histograms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        Histogram::from_arc(samples)
    }
}
