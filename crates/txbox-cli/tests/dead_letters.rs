//! `txbox dead-letters`: listing with filters, `show`, and replay and
//! discard as dry runs unless `--execute`, refused with no selection, each
//! leaving an audit row. Relay dead letters are staged again into the
//! outbox with their event id. Real Postgres. (The inbox's replay through
//! the handler is in `tests/inbox_dead_letter_operations.rs`.)

use std::process::{Command, Output};

use txbox_testkit::TestDb;

fn txbox(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_txbox"))
        .args(["--database-url", db.url()])
        .args(args)
        .env_remove("TXBOX_SCHEMA")
        .env("USER", "cli-test")
        .output()
        .expect("run txbox")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db.pool()).await.unwrap()
}

#[tokio::test]
async fn relay_dead_letters_are_listed_shown_replayed_and_discarded() {
    let db = TestDb::new().await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO txbox.relay_dead_letters (outbox_id, stream, txid, topic, key, payload, headers, event_id, error)
         VALUES (11, 0, '100', 'orders', 'k1', 'too big', '[{\"key\":\"h\",\"value\":\"v\"}]',
                 'a2f847a1-413a-50bf-834c-cea1b8baeb14', 'MsgSizeTooLarge: record too large'),
                (12, 1, '101', 'billing', NULL, '\\xff00', '[]',
                 'b2f847a1-413a-50bf-834c-cea1b8baeb14', 'UnknownTopic')
         RETURNING id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();

    let listed = txbox(&db, &["dead-letters", "--relay", "--error", "too LARGE"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let out = stdout(&listed);
    assert!(
        out.contains("orders") && !out.contains("billing") && out.contains("(1 rows)"),
        "{out}"
    );

    let shown = txbox(
        &db,
        &["dead-letters", "--relay", "show", &ids[1].to_string()],
    );
    let out = stdout(&shown);
    assert!(
        out.contains("payload:\nbase64:/wA="),
        "binary payload as base64: {out}"
    );

    let refused = txbox(&db, &["dead-letters", "replay", "--relay"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("--all"), "{}", stderr(&refused));

    let id = ids[0].to_string();
    let dry = txbox(&db, &["dead-letters", "replay", "--relay", "--id", &id]);
    assert!(stdout(&dry).contains("dry run"), "{}", stdout(&dry));
    assert_eq!(count(&db, "SELECT count(*) FROM txbox.outbox").await, 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM txbox.relay_dead_letters").await,
        2
    );

    let done = txbox(
        &db,
        &[
            "dead-letters",
            "replay",
            "--relay",
            "--id",
            &id,
            "--execute",
        ],
    );
    assert!(done.status.success(), "{}", stderr(&done));
    let staged: (String, Vec<u8>, Vec<u8>, String, serde_json::Value) =
        sqlx::query_as("SELECT topic, key, payload, event_id::text, headers FROM txbox.outbox")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        (
            staged.0.as_str(),
            &staged.1[..],
            &staged.2[..],
            staged.3.as_str()
        ),
        (
            "orders",
            &b"k1"[..],
            &b"too big"[..],
            "a2f847a1-413a-50bf-834c-cea1b8baeb14"
        ),
        "staged again with its event id"
    );
    assert_eq!(staged.4, serde_json::json!([{"key": "h", "value": "v"}]));
    assert_eq!(
        count(&db, "SELECT count(*) FROM txbox.relay_dead_letters").await,
        1
    );

    let no_reason = txbox(
        &db,
        &[
            "dead-letters",
            "discard",
            "--relay",
            "--stream",
            "1",
            "--reason",
            "",
        ],
    );
    assert_eq!(no_reason.status.code(), Some(1));
    let discarded = txbox(
        &db,
        &[
            "dead-letters",
            "discard",
            "--relay",
            "--stream",
            "1",
            "--reason",
            "topic retired",
            "--execute",
        ],
    );
    assert!(discarded.status.success(), "{}", stderr(&discarded));
    assert_eq!(
        count(&db, "SELECT count(*) FROM txbox.relay_dead_letters").await,
        0
    );

    let audit: Vec<(String, String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT kind, action, actor, reason, dead_letter->>'topic' FROM txbox.dead_letter_audit ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        audit,
        vec![
            (
                "relay".into(),
                "replayed".into(),
                "cli-test".into(),
                None,
                "orders".into()
            ),
            (
                "relay".into(),
                "discarded".into(),
                "cli-test".into(),
                Some("topic retired".into()),
                "billing".into()
            ),
        ]
    );
}

#[tokio::test]
async fn inbox_dead_letters_are_filtered_and_replay_is_requested() {
    let db = TestDb::new().await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO txbox.inbox_dead_letters (consumer_group, topic, partition, \"offset\", event_id,
             payload, error, attempts, first_failed_at, last_failed_at)
         VALUES ('ledger', 'payments', 0, 5, 'e-5', 'x', 'timeout talking to bank', 5, now(), now()),
                ('ledger', 'payments', 1, 9, 'e-9', 'y', 'bad amount', 1, now(), now()),
                ('audit', 'payments', 0, 5, 'e-5', 'x', 'timeout', 5, now(), now())
         RETURNING id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let listed = txbox(
        &db,
        &["dead-letters", "--group", "ledger", "--partition", "0"],
    );
    let out = stdout(&listed);
    assert!(
        out.contains("e-5") && !out.contains("e-9") && out.contains("(1 rows)"),
        "{out}"
    );

    let requested = txbox(
        &db,
        &[
            "dead-letters",
            "replay",
            "--group",
            "ledger",
            "--error",
            "timeout",
            "--execute",
        ],
    );
    assert!(requested.status.success(), "{}", stderr(&requested));
    let marked: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT id, replay_requested_by FROM txbox.inbox_dead_letters
         WHERE replay_requested_at IS NOT NULL ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        marked,
        vec![(ids[0], Some("cli-test".into()))],
        "only ledger's timeout"
    );

    let shown = txbox(&db, &["dead-letters", "show", &ids[0].to_string()]);
    let out = stdout(&shown);
    assert!(
        out.contains("position:        payments/0@5") && out.contains("replay:          requested"),
        "{out}"
    );
}
