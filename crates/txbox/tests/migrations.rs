//! `txbox migrate`: explicit, locked, checksummed, schema-configurable.

use sqlx::postgres::PgPoolOptions;
use txbox::schema::MigrationState;
use txbox::{Error, MigrateError, Migrator, Schema};
use txbox_testkit::TestDb;

async fn empty_schema(db: &TestDb, name: &str) -> (sqlx::PgPool, Migrator) {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(db.url())
        .await
        .unwrap();
    (pool, Migrator::new(Schema::new(name).unwrap()))
}

#[tokio::test]
async fn services_refuse_an_unmigrated_schema_and_accept_a_migrated_one() {
    let db = TestDb::new().await;
    let (pool, m) = empty_schema(&db, "svc_a").await;
    let err = m.verify(&pool).await.unwrap_err();
    assert!(matches!(err, Error::SchemaNotReady { .. }), "{err}");
    assert!(
        err.to_string().contains("txbox migrate --schema svc_a"),
        "{err}"
    );
    let applied = m.run(&pool).await.unwrap();
    assert_eq!(applied.len(), txbox::schema::MIGRATIONS.len());
    m.verify(&pool).await.unwrap();
    assert!(
        m.run(&pool).await.unwrap().is_empty(),
        "second run applies nothing"
    );
}

#[tokio::test]
async fn concurrent_migrators_apply_each_migration_once() {
    let db = TestDb::new().await;
    let (pool, m) = empty_schema(&db, "race").await;
    let runs = (0..6).map(|_| {
        let (pool, m) = (pool.clone(), m.clone());
        tokio::spawn(async move { m.run(&pool).await.map(|v| v.len()) })
    });
    let mut total = 0;
    for r in futures::future::join_all(runs).await {
        total += r.unwrap().unwrap();
    }
    assert_eq!(
        total,
        txbox::schema::MIGRATIONS.len(),
        "each migration applied by exactly one migrator"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM race._txbox_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, txbox::schema::MIGRATIONS.len());
}

#[tokio::test]
async fn a_modified_applied_migration_is_refused() {
    let db = TestDb::new().await;
    let (pool, m) = empty_schema(&db, "edited").await;
    m.run(&pool).await.unwrap();
    sqlx::query("UPDATE edited._txbox_migrations SET checksum = '\\x00' WHERE version = 2")
        .execute(&pool)
        .await
        .unwrap();
    let err = m.run(&pool).await.unwrap_err();
    assert!(
        matches!(&err, Error::Migrate(e) if matches!(**e, MigrateError::Modified { version: 2, .. })),
        "{err}"
    );
    let status = m.status(&pool).await.unwrap();
    assert_eq!(status[1].state, MigrationState::Modified);
    assert!(m.verify(&pool).await.is_err());
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let db = TestDb::new().await;
    let (pool, m) = empty_schema(&db, "dry").await;
    let sql = m.dry_run(&pool).await.unwrap();
    assert!(sql.contains("CREATE TABLE inbox_offsets"));
    assert!(sql.contains(r#"SET LOCAL search_path TO "dry""#));
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('dry')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(exists, None, "dry run must not create the schema");
    assert!(m
        .status(&pool)
        .await
        .unwrap()
        .iter()
        .all(|s| s.state == MigrationState::Pending));
}

#[tokio::test]
async fn a_hostile_schema_name_stays_one_identifier() {
    let db = TestDb::new().await;
    let name = r#"x"; DROP TABLE canary; --"#;
    let (pool, m) = empty_schema(&db, name).await;
    sqlx::query("CREATE TABLE canary (id int)")
        .execute(&pool)
        .await
        .unwrap();
    m.run(&pool).await.unwrap();
    m.verify(&pool).await.unwrap();
    let canary: Option<String> = sqlx::query_scalar("SELECT to_regclass('public.canary')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        canary.as_deref(),
        Some("canary"),
        "the canary table survives"
    );
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = $1")
        .bind(name)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        tables >= 6,
        "txbox tables live in the oddly named schema, found {tables}"
    );
}

#[test]
fn bad_schema_names_are_typed_errors() {
    assert!(matches!(Schema::new(""), Err(Error::Config(_))));
    assert!(matches!(Schema::new("a".repeat(64)), Err(Error::Config(_))));
    assert!(matches!(Schema::new("a\0b"), Err(Error::Config(_))));
}
