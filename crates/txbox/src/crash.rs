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
//! Without the feature the macro compiles to nothing.

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
        // Returns once the harness has sent SIGCONT.
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &std::process::id().to_string()])
            .status();
        return;
    }
    loop {
        std::thread::park();
    }
}
