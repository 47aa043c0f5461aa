//! The chaos run in CI: 20,000 payment requests through the chain while
//! its processes, the broker and the database are killed and restarted,
//! once with the relay in exactly-once mode and once, shorter, in
//! at-least-once mode (the ledger's inbox absorbing the relay's
//! duplicates). Each run must print PASS with its seed and exit 0; on
//! FAIL its output names every violation and where the logs are.
//!
//! The binaries of the chain are the ones `cargo test --workspace` builds
//! beside this test (`cargo build -p txbox-relay -p payments-example`
//! otherwise).

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn chaos(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_txbox-chaos"))
        .args(args)
        .output()
        .expect("run txbox-chaos");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "txbox-chaos {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    assert!(last.contains(": PASS seed="), "{last}");
    last
}

#[test]
fn the_chain_keeps_every_effect_once_under_faults() {
    let seed = std::env::var("TXBOX_CHAOS_SEED").unwrap_or_else(|_| "20261202".to_owned());
    let last = chaos(&["--events", "20000", "--rate", "500", "--seed", &seed]);
    assert!(
        last.contains("broker restarts 1, postgres restarts 1"),
        "{last}"
    );
    assert!(last.contains("freezes 1"), "{last}");
}

#[test]
fn an_at_least_once_relay_changes_no_outcome() {
    chaos(&[
        "--events",
        "5000",
        "--rate",
        "500",
        "--seed",
        "7",
        "--relay-mode",
        "at-least-once",
    ]);
}
