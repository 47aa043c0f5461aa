//! `txbox offsets reset`: a dry run by default, `--execute` to apply, a
//! clear failure for positions never stored. Real Postgres.

use std::process::{Command, Output};

use txbox_testkit::TestDb;

fn txbox(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_txbox"))
        .args(["--database-url", db.url()])
        .args(args)
        .env_remove("TXBOX_SCHEMA")
        .output()
        .expect("run txbox")
}

/// `txbox offsets reset --group ledger --topic payments` and `args`.
fn reset(db: &TestDb, args: &[&str]) -> Output {
    let mut all = vec![
        "offsets", "reset", "--group", "ledger", "--topic", "payments",
    ];
    all.extend_from_slice(args);
    txbox(db, &all)
}

async fn positions(db: &TestDb) -> Vec<(i32, i64, i64)> {
    sqlx::query_as(
        "SELECT partition, next_offset, epoch FROM txbox.inbox_offsets
         WHERE consumer_group = 'ledger' ORDER BY partition",
    )
    .fetch_all(db.pool())
    .await
    .expect("positions")
}

#[tokio::test]
async fn offsets_reset_previews_then_executes_and_refuses_unknown_partitions() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO txbox.inbox_offsets (consumer_group, topic, partition, next_offset, epoch, owner)
         VALUES ('ledger', 'payments', 0, 120, 3, 'host-a:1'), ('ledger', 'payments', 1, 7, 1, 'host-a:1')",
    )
    .execute(db.pool())
    .await
    .expect("seed positions");
    let seeded = positions(&db).await;

    let dry = reset(&db, &["--shift-by", "-50"]);
    assert!(dry.status.success(), "{dry:?}");
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(
        out.contains("ledger\tpayments\t0\t120\t70\thost-a:1"),
        "{out}"
    );
    assert!(
        out.contains("ledger\tpayments\t1\t7\t0\thost-a:1"),
        "floored at 0: {out}"
    );
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(positions(&db).await, seeded, "a dry run changes nothing");

    let run = reset(&db, &["--partition", "0", "--to-offset", "10", "--execute"]);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(
        positions(&db).await,
        vec![(0, 10, 4), (1, 7, 1)],
        "partition 0 moved and fenced (epoch + 1), partition 1 untouched"
    );

    let missing = reset(&db, &["--partition", "9", "--to-offset", "0", "--execute"]);
    assert!(!missing.status.success(), "{missing:?}");
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("no stored inbox position") && err.contains("[9]"),
        "{err}"
    );
    assert_eq!(positions(&db).await, vec![(0, 10, 4), (1, 7, 1)]);

    // A shift past the largest offset saturates instead of failing.
    let far = reset(
        &db,
        &[
            "--partition",
            "1",
            "--shift-by",
            "9223372036854775807",
            "--execute",
        ],
    );
    assert!(far.status.success(), "{far:?}");
    assert_eq!(positions(&db).await, vec![(0, 10, 4), (1, i64::MAX, 2)]);

    let neither = reset(&db, &[]);
    assert!(!neither.status.success(), "needs --to-offset or --shift-by");
}
