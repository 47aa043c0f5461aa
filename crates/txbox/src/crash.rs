//! Named crash points for fault-injection tests.
//!
//! With the `failpoints` feature, `crash_point!("inbox.after_commit")`
//! consults the `fail` crate's registry (configured through the
//! `FAILPOINTS` environment variable, e.g.
//! `FAILPOINTS=inbox.after_commit=3*off->return`). When the point fires, the
//! process prints `TXBOX_CRASH_POINT <name>` on stderr and stops making
//! progress, so a test harness can SIGKILL it at exactly that step. Without
//! the feature the macro compiles to nothing.

/// Marks a step where tests may kill the process.
#[macro_export]
#[doc(hidden)]
macro_rules! crash_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if ::fail::eval($name, |_| ()).is_some() {
                $crate::crash::reached($name);
            }
        }
    };
}

/// Announces the crash point and parks the process until it is killed.
#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub fn reached(name: &str) -> ! {
    use std::io::Write as _;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "TXBOX_CRASH_POINT {name}");
    let _ = err.flush();
    drop(err);
    loop {
        std::thread::park();
    }
}
