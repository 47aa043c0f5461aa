//! Names for processes: who owns a partition or a stream.

use std::sync::OnceLock;

/// This process's name as an owner of partitions (inbox) and streams
/// (relay): `host:pid:nonce`, unique per process start.
///
/// The host is `$HOSTNAME`, else the kernel's hostname, else `localhost`;
/// the pid alone repeats (pid 1 in every container, a restarted process on
/// the same host), so a random nonce drawn once per process makes two
/// starts never share a name. Every call in one process returns the same
/// name.
///
/// # Examples
///
/// ```
/// let name = txbox::instance::name();
/// assert_eq!(name, txbox::instance::name());
/// assert!(name.contains(&format!(":{}:", std::process::id())));
/// ```
pub fn name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        format!("{}:{}:{}", host(), std::process::id(), &nonce[..8])
    })
}

fn host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
