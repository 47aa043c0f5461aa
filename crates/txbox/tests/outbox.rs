//! Staging: atomic with the caller's transaction, one round trip, ids and
//! CloudEvents headers always present.

use txbox::{Headers, Outbox, OutboxEvent};
use txbox_testkit::TestDb;
use uuid::Uuid;

async fn rows(
    db: &TestDb,
) -> Vec<(
    i32,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    serde_json::Value,
    Uuid,
)> {
    sqlx::query_as(
        "SELECT stream, topic, key, payload, headers, event_id FROM txbox.outbox ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn staged_events_exist_only_if_the_transaction_commits() {
    let db = TestDb::new().await;
    let outbox = Outbox::new(db.schema().clone());

    let mut tx = db.pool().begin().await.unwrap();
    outbox
        .stage(&mut tx, OutboxEvent::new("t", "rolled back"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(rows(&db).await.is_empty());

    let mut tx = db.pool().begin().await.unwrap();
    let id = outbox
        .stage(
            &mut tx,
            OutboxEvent::json("orders", &serde_json::json!({"n": 1}))
                .unwrap()
                .key("k1")
                .event_type("OrderPlaced")
                .source("/shop"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let got = rows(&db).await;
    assert_eq!(got.len(), 1);
    let (stream, topic, key, payload, headers, event_id) = &got[0];
    assert_eq!((*stream, topic.as_str()), (0, "orders"));
    assert_eq!(key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(payload.as_deref(), Some(&br#"{"n":1}"#[..]));
    assert_eq!(*event_id, id);
    let h = Headers::from_json(headers).unwrap();
    assert_eq!(
        h.get("ce_id"),
        None,
        "the relay adds ce_id from the event_id column"
    );
    assert_eq!(h.get("ce_type"), Some(&b"OrderPlaced"[..]));
    assert_eq!(h.get("ce_source"), Some(&b"/shop"[..]));
    assert_eq!(h.get("content-type"), Some(&b"application/json"[..]));
}

#[tokio::test]
async fn bulk_staging_keeps_order_ids_binary_headers_and_streams() {
    let db = TestDb::new().await;
    let outbox = Outbox::new(db.schema().clone()).streams(4).unwrap();
    let given = Uuid::new_v4();
    let events: Vec<OutboxEvent> = (0..500)
        .map(|i| {
            let e = OutboxEvent::new("bulk", format!("{i}"))
                .key(format!("key-{}", i % 37))
                .header("bin", vec![0xff, i as u8]);
            if i == 7 {
                e.event_id(given)
            } else {
                e
            }
        })
        .chain([OutboxEvent::tombstone("bulk", "gone")])
        .collect();
    let mut tx = db.pool().begin().await.unwrap();
    let ids = outbox.stage_all(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ids.len(), 501);
    assert_eq!(ids[7], given);

    let got = rows(&db).await;
    assert_eq!(got.len(), 501);
    for (i, (stream, _, key, payload, headers, id)) in got.iter().take(500).enumerate() {
        assert_eq!(
            payload.as_deref(),
            Some(format!("{i}").as_bytes()),
            "staging order kept"
        );
        assert_eq!(*id, ids[i]);
        let key = key.as_deref().unwrap();
        assert_eq!(*stream, txbox::outbox::stream_for_key(key, 4));
        let h = Headers::from_json(headers).unwrap();
        assert_eq!(
            h.get("bin"),
            Some(&[0xff, i as u8][..]),
            "non-UTF-8 header survives"
        );
    }
    assert_eq!(got[500].3, None, "tombstone payload is NULL");
    let streams: std::collections::HashSet<i32> = got.iter().map(|r| r.0).collect();
    assert!(streams.len() > 1, "keys spread over streams");
}

#[tokio::test]
async fn invalid_events_are_typed_errors_and_stage_nothing() {
    let db = TestDb::new().await;
    let outbox = Outbox::new(db.schema().clone());
    let mut tx = db.pool().begin().await.unwrap();
    let err = outbox
        .stage_all(
            &mut tx,
            [
                OutboxEvent::new("ok", "a"),
                OutboxEvent::new("bad topic!", "b"),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, txbox::Error::InvalidEvent(_)), "{err}");
    tx.commit().await.unwrap();
    assert!(rows(&db).await.is_empty());
    assert!(Outbox::new(db.schema().clone()).streams(0).is_err());
}

#[tokio::test]
async fn notify_is_sent_on_commit_only() {
    let db = TestDb::new().await;
    let outbox = Outbox::new(db.schema().clone()).notify("txbox_test_wake");
    let mut listener = sqlx::postgres::PgListener::connect(db.url()).await.unwrap();
    listener.listen("txbox_test_wake").await.unwrap();

    let mut tx = db.pool().begin().await.unwrap();
    outbox
        .stage(&mut tx, OutboxEvent::new("t", "x"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let none = tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv()).await;
    assert!(
        none.is_err(),
        "no notification from a rolled-back transaction"
    );

    let mut tx = db.pool().begin().await.unwrap();
    outbox
        .stage(&mut tx, OutboxEvent::new("t", "y"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.payload(), "0");
}
