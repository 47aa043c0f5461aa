//! What in a `txbox status` report needs a person (exit code 2).

use std::time::Duration;

use super::Report;

/// One line per condition that needs a person, empty when none does:
/// a stream with a backlog and no live lease, a stream whose stored
/// history is not the database's, dead letters (inbox or relay), a
/// transaction holding the relay back for longer than `hold_back_alert`,
/// brokers given but the lag of an inbox partition not measurable (the
/// brokers unreachable, say): "nothing needs attention" would then be a
/// claim about lag nobody measured.
pub(crate) fn reasons(report: &Report, hold_back_alert: Duration) -> Vec<String> {
    let mut out = Vec::new();
    for s in &report.relay {
        if s.backlog > 0 && !s.lease_live {
            let why = match (&s.owner, s.lease_expires_at) {
                (None, _) => "no owner".to_owned(),
                (Some(o), Some(at)) => format!("the lease of {o} expired at {at}"),
                (Some(o), None) => format!("{o} holds no lease"),
            };
            out.push(format!(
                "relay stream {}: {} unpublished row(s) and {why}: is a relay running for it?",
                s.stream, s.backlog
            ));
        }
        if let Some(e) = &s.history_error {
            out.push(format!(
                "relay stream {}: stored history is not this database's ({e}); see `txbox relay re-anchor --stream {}`",
                s.stream, s.stream
            ));
        }
        if s.dead_letters > 0 {
            out.push(format!(
                "relay stream {}: {} relay dead letter(s) (rows not published) in relay_dead_letters",
                s.stream, s.dead_letters
            ));
        }
    }
    for p in &report.inbox {
        if let Some(e) = &p.log_error {
            out.push(format!(
                "inbox group {} topic {} partition {}: lag unknown, the log end cannot be read ({e})",
                p.group, p.topic, p.partition
            ));
        }
    }
    for g in &report.inbox_dead_letters {
        if g.count > 0 {
            out.push(format!(
                "inbox group {}: {} dead letter(s); see `txbox dead-letters --group {}`",
                g.group, g.count, g.group
            ));
        }
    }
    if let Some(h) = &report.hold_back {
        if h.age_seconds > hold_back_alert.as_secs_f64() {
            out.push(format!(
                "transaction of pid {} (database {}) has run for {:.0}s, holding the relay back \
                 (alert above {}s; pg_cancel_backend({}) ends it)",
                h.pid,
                h.database.as_deref().unwrap_or("?"),
                h.age_seconds,
                hold_back_alert.as_secs_f64(),
                h.pid
            ));
        }
    }
    out
}
