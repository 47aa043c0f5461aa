//! Named crash points for fault-injection tests.
//!
//! With the `failpoints` feature, `crash_point!("inbox.after_commit")`
//! consults the `fail` crate's registry (configured through the
//! `FAILPOINTS` environment variable, e.g.
//! `FAILPOINTS=inbox.after_commit=3*off->return`). When the point fires, the
//! process prints `TXBOX_CRASH_POINT <name>` on stderr and then:
//!
//! - with `return` (no argument), stops making progress, so a test harness
//!   can SIGKILL it at exactly that step;
//! - with `return(freeze)`, stops itself with SIGSTOP at exactly that step
//!   (a long GC pause, a descheduled VM), and carries on from there when
//!   the harness sends SIGCONT: a zombie that wakes up.
//!
//! [`delay_point!`](crate::delay_point) marks a step tests may only slow
//! down (`fail`'s `sleep(ms)` action): it is no crash point and is not
//! swept.
//!
//! Without the feature both macros compile to nothing.
//!
//! [`POINTS`] lists every crash point in txbox and txbox-relay; a unit
//! test checks it against the sources, and `tests/crash_sweep.rs` kills
//! a real pair of processes at each one in turn.

/// Every crash point compiled into txbox and txbox-relay, namespaced by
/// the component that reaches it (`inbox.`, `outbox.`, `relay.`).
///
/// The single list the crash sweep (`tests/crash_sweep.rs`) enumerates. A
/// unit test scans the crates' sources for `crash_point!` and fails when
/// a point there is missing here, or a point here is in no source.
#[doc(hidden)]
pub const POINTS: &[&str] = &[
    "inbox.before_business_write",
    "inbox.after_business_write",
    "inbox.before_commit",
    "inbox.after_commit",
    "outbox.before_stage",
    "relay.after_produce",
    "relay.before_kafka_commit",
    "relay.after_kafka_commit",
    "relay.after_db_position",
    "relay.during_prune",
];

/// Marks a step where tests may kill or freeze the process.
#[macro_export]
#[doc(hidden)]
macro_rules! crash_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if let Some(action) = ::fail::eval($name, |arg| arg) {
                $crate::crash::reached($name, action.as_deref());
            }
        }
    };
}

/// Marks a step where tests may stall the thread that reaches it, with
/// `fail`'s `sleep(ms)` action (e.g.
/// `FAILPOINTS=inbox.before_release=sleep(3000)`): a consumer that learns
/// late that it lost a partition. Not a crash point: not in [`POINTS`],
/// not swept.
#[macro_export]
#[doc(hidden)]
macro_rules! delay_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        {
            // `fail` sleeps inside `eval` for `sleep(ms)`; other actions
            // have no meaning here.
            let _ = ::fail::eval($name, |_| ());
        }
    };
}

/// Announces the crash point, then parks the process until it is killed,
/// or (`action` = `freeze`) stops it until it is continued.
#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub fn reached(name: &str, action: Option<&str>) {
    use std::io::Write as _;
    let freeze = action == Some("freeze");
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "TXBOX_CRASH_POINT {name}{}",
        if freeze { " (frozen)" } else { "" }
    );
    let _ = err.flush();
    drop(err);
    if freeze {
        // raise(3) sends SIGSTOP to this thread, which stops the whole
        // process before the call returns: nothing after the point runs
        // until the harness sends SIGCONT. (A `kill -STOP` of our own pid
        // is delivered to whichever thread the kernel picks; this one could
        // run on, e.g. send its COMMIT, before the process stops.)
        match nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP) {
            Ok(()) => return,
            // The test cannot go on as planned: park, as for `return`.
            Err(e) => eprintln!("TXBOX_CRASH_POINT {name}: SIGSTOP failed ({e}); parking instead"),
        }
    }
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// The macro's invocation, spelled so this file's own text does not
    /// match it.
    const CALL: &str = concat!("crash_point", "!(");

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }

    /// The names passed to `crash_point!` in `source`, outside comments.
    /// An argument that is not a string literal is an error: the list
    /// could not be checked.
    fn points_in(source: &str, file: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for (n, line) in source.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            let mut rest = line;
            while let Some(at) = rest.find(CALL) {
                rest = &rest[at + CALL.len()..];
                let name = rest
                    .trim_start()
                    .strip_prefix('"')
                    .and_then(|r| r.split_once('"'))
                    .map(|(name, _)| name)
                    .unwrap_or_else(|| {
                        panic!(
                            "{}:{}: crash points take a string literal, so \
                             txbox::crash::POINTS can be checked",
                            file.display(),
                            n + 1
                        )
                    });
                found.push(name.to_owned());
            }
        }
        found
    }

    #[test]
    fn points_lists_every_crash_point_in_the_sources() {
        let txbox = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for src in [txbox.join("src"), txbox.join("../txbox-relay/src")] {
            assert!(src.is_dir(), "{} is not a directory", src.display());
            rust_files(&src, &mut files);
        }
        let mut in_sources = BTreeSet::new();
        for file in &files {
            let source = std::fs::read_to_string(file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            in_sources.extend(points_in(&source, file));
        }
        let listed: BTreeSet<String> = super::POINTS.iter().map(|p| (*p).to_owned()).collect();
        assert_eq!(
            super::POINTS.len(),
            listed.len(),
            "POINTS names a point twice"
        );
        let unlisted: Vec<_> = in_sources.difference(&listed).collect();
        let stale: Vec<_> = listed.difference(&in_sources).collect();
        assert!(
            unlisted.is_empty() && stale.is_empty(),
            "txbox::crash::POINTS is out of date: in the sources but not listed {unlisted:?}; \
             listed but in no source {stale:?}"
        );
        for point in &listed {
            assert!(
                ["inbox.", "outbox.", "relay."]
                    .iter()
                    .any(|ns| point.starts_with(ns)),
                "{point}: crash points are namespaced inbox., outbox. or relay."
            );
        }
    }

    #[test]
    fn the_scan_reads_literals_and_skips_comments() {
        let file = Path::new("example.rs");
        let source = format!(
            "// {CALL}\"commented\")\n    crate::{CALL}\"a.b\"); txbox::{CALL} \"c.d\");\n"
        );
        assert_eq!(points_in(&source, file), ["a.b", "c.d"]);
    }
}
