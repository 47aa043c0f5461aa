//! Which database errors are worth retrying as they are.

/// SQLSTATEs that mean "try the same transaction again": serialization
/// failure, deadlock, and the server or connection going away.
const TRANSIENT_SQLSTATES: &[&str] = &[
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "55P03", // lock_not_available (lock_timeout)
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now
    "53300", // too_many_connections
    "08000", "08001", "08003", "08004", "08006", // connection exceptions
];

/// True when `err` is transient: a retry of the same work may succeed.
///
/// Serialization failures (40001), deadlocks (40P01), lock timeouts, server
/// shutdowns and lost or refused connections are transient. Constraint
/// violations, syntax errors and decode errors are not.
///
/// # Examples
///
/// ```
/// assert!(txbox::db::is_transient(&sqlx::Error::PoolTimedOut));
/// assert!(!txbox::db::is_transient(&sqlx::Error::RowNotFound));
/// ```
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| TRANSIENT_SQLSTATES.contains(&code.as_ref())),
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        _ => false,
    }
}
