//! The human view of a `txbox status` report: tab-separated sections.

use super::Report;

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| v.to_string())
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| format!("{v:.1}"))
}

/// Prints `report` as tables, then the reasons (or that all is well).
pub(crate) fn print(report: &Report) {
    println!("inbox partitions");
    println!(
        "group\ttopic\tpart\tnext_offset\tlog_end\tlag\tlag_s\towner\tepoch\tapplied\tduplicates\tdead_lettered"
    );
    for p in &report.inbox {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            p.group,
            p.topic,
            p.partition,
            p.next_offset,
            opt(p.log_end),
            opt(p.lag),
            secs(p.lag_seconds),
            p.owner.as_deref().unwrap_or(""),
            p.epoch,
            p.applied,
            p.duplicates,
            p.dead_lettered
        );
    }
    if !report.brokers {
        println!("(no --brokers: log ends and lag unknown)");
    } else if let Some(e) = report.inbox.iter().find_map(|p| p.log_error.as_deref()) {
        println!("(brokers: {e})");
    }
    println!();
    println!("inbox dead letters");
    println!("group\tcount");
    for g in &report.inbox_dead_letters {
        println!("{}\t{}", g.group, g.count);
    }
    println!();
    println!("relay streams");
    println!(
        "stream\towner\tlease\tposition\tpublished\tbacklog\toldest_s\tupdated_at\tdead_letters\thistory"
    );
    for s in &report.relay {
        let lease = match (s.lease_live, s.lease_expires_at) {
            (true, Some(at)) => format!("until {}", at.format("%H:%M:%S")),
            (false, Some(at)) => format!("expired {}", at.format("%H:%M:%S")),
            (_, None) => "none".to_owned(),
        };
        println!(
            "{}\t{}\t{}\t({}, {})\t{}\t{}\t{}\t{}\t{}\t{}",
            s.stream,
            s.owner.as_deref().unwrap_or(""),
            lease,
            s.position_txid,
            s.position_id,
            s.published,
            s.backlog,
            if s.backlog == 0 {
                "-".to_owned()
            } else {
                secs(s.oldest_unpublished_age_seconds)
            },
            s.updated_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            s.dead_letters,
            s.history
        );
    }
    println!();
    match &report.hold_back {
        Some(h) => println!(
            "oldest transaction (holds the relay back): pid {} in {}, {:.1}s, query started {}: {}",
            h.pid,
            h.database.as_deref().unwrap_or("?"),
            h.age_seconds,
            h.query_start.as_deref().unwrap_or("?"),
            h.query.as_deref().unwrap_or("").replace('\n', " ")
        ),
        None => println!("no transaction holds the relay back"),
    }
    println!();
    if report.reasons.is_empty() {
        println!("ok: nothing needs attention");
    } else {
        println!("needs attention:");
        for r in &report.reasons {
            println!("  - {r}");
        }
    }
}
