//! The seeded fault schedule.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng as _;

/// A process of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Service {
    /// A `payments-example` instance (two share the consumer group).
    Payments(usize),
    /// `txbox-relay`.
    Relay,
    /// `ledger-example`.
    Ledger,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Service::Payments(i) => write!(f, "payments-{i}"),
            Service::Relay => f.write_str("relay"),
            Service::Ledger => f.write_str("ledger"),
        }
    }
}

/// What to do to the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// SIGKILL, then start again after `down`.
    Kill { service: Service, down: Duration },
    /// SIGSTOP past the session timeout, then SIGCONT.
    Freeze { service: Service },
    /// `kill -9` of the broker, then a restart with its data.
    RestartKafka,
    /// `pg_ctl stop -m immediate`, then a restart (crash recovery).
    RestartPostgres,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Kill { service, down } => {
                write!(
                    f,
                    "SIGKILL {service}, restart after {} ms",
                    down.as_millis()
                )
            }
            Kind::Freeze { service } => write!(f, "SIGSTOP {service} past its session timeout"),
            Kind::RestartKafka => f.write_str("kill -9 the broker, restart it"),
            Kind::RestartPostgres => f.write_str("crash PostgreSQL, restart it"),
        }
    }
}

/// The next fault and the pause before it.
#[derive(Debug)]
pub(crate) struct Fault {
    pub(crate) after: Duration,
    pub(crate) kind: Kind,
}

/// Draws faults from a seeded generator: kills of random processes, and
/// once each, when the load has come that far, a freeze (30 %), a broker
/// restart (45 %) and a database restart (70 %).
#[derive(Debug)]
pub(crate) struct Schedule {
    rng: StdRng,
    every: Duration,
    froze: bool,
    kafka: bool,
    postgres: bool,
    killed: [bool; SERVICES.len()],
}

const SERVICES: [Service; 4] = [
    Service::Payments(0),
    Service::Payments(1),
    Service::Relay,
    Service::Ledger,
];

impl Schedule {
    /// Faults drawn from `rng`, on average `every` apart (uniformly from
    /// half to one and a half times that).
    pub(crate) fn new(rng: StdRng, every: Duration) -> Self {
        Schedule {
            rng,
            every,
            froze: false,
            kafka: false,
            postgres: false,
            killed: [false; SERVICES.len()],
        }
    }

    /// True once each one-off fault was drawn and each process killed.
    pub(crate) fn finished(&self) -> bool {
        self.froze && self.kafka && self.postgres && self.killed.iter().all(|&k| k)
    }

    /// The next fault, given the share of the load produced so far.
    pub(crate) fn next(&mut self, progress: f64) -> Fault {
        let after = self.every.mul_f64(self.rng.gen_range(0.5..1.5));
        let kind = if !self.froze && progress >= 0.3 {
            self.froze = true;
            Kind::Freeze {
                service: Service::Payments(self.rng.gen_range(0..2)),
            }
        } else if !self.kafka && progress >= 0.45 {
            self.kafka = true;
            Kind::RestartKafka
        } else if !self.postgres && progress >= 0.7 {
            self.postgres = true;
            Kind::RestartPostgres
        } else {
            // Past half the load, a process not killed yet goes first.
            let drawn = self.rng.gen_range(0..SERVICES.len());
            let index = match self.killed.iter().position(|&k| !k) {
                Some(spared) if progress >= 0.5 => spared,
                _ => drawn,
            };
            self.killed[index] = true;
            Kind::Kill {
                service: SERVICES[index],
                down: Duration::from_millis(self.rng.gen_range(100..1500)),
            }
        };
        Fault { after, kind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    fn run(seed: u64) -> Vec<Kind> {
        let mut s = Schedule::new(StdRng::seed_from_u64(seed), Duration::from_secs(2));
        (0..20).map(|i| s.next(f64::from(i) / 20.0).kind).collect()
    }

    #[test]
    fn a_seed_gives_one_schedule_with_each_one_off_fault_once() {
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let kinds = run(7);
        let count = |f: fn(&Kind) -> bool| kinds.iter().filter(|k| f(k)).count();
        assert_eq!(count(|k| matches!(k, Kind::Freeze { .. })), 1);
        assert_eq!(count(|k| *k == Kind::RestartKafka), 1);
        assert_eq!(count(|k| *k == Kind::RestartPostgres), 1);
        for service in SERVICES {
            assert!(
                kinds
                    .iter()
                    .any(|k| matches!(k, Kind::Kill { service: s, .. } if *s == service)),
                "{service} never killed"
            );
        }
    }
}
