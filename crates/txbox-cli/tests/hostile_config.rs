//! The `txbox` binary under hostile configuration: passwords in database
//! URLs (user info or `?password=`, by flag or `TXBOX_DATABASE_URL`)
//! against an unreachable host, a server refusing the password, a missing
//! role and a good server, never shown; schema names that are odd but
//! valid, used as one quoted identifier; schema names PostgreSQL cannot
//! hold, refused before any write; unreachable brokers; negative numbers.
//! Every run ends by itself within a bound.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use txbox_testkit::process::{run_for, Run};
use txbox_testkit::{free_port, RefusingPg, TestDb};

const PASSWORD: &str = "pw-hostile-9c2e";
/// Longer than any run here may take.
const BOUND: Duration = Duration::from_secs(40);

async fn txbox(args: &[&str], envs: &[(&str, &str)]) -> Run {
    run_for(Path::new(env!("CARGO_BIN_EXE_txbox")), args, envs, BOUND).await
}

/// `host:port` of the test server.
fn server(db: &TestDb) -> String {
    let after = db.url().split_once('@').map_or(db.url(), |p| p.1);
    after.split('/').next().unwrap().to_owned()
}

/// The database URL forms carrying [`PASSWORD`], for `host` and `db`.
fn urls(host: &str, db: &str, user: &str) -> [String; 2] {
    [
        format!("postgres://{user}:{PASSWORD}@{host}/{db}"),
        format!("postgres://{host}/{db}?user={user}&password={PASSWORD}&sslmode=prefer"),
    ]
}

/// Runs `args` with `url` once as `--database-url` and once as
/// `TXBOX_DATABASE_URL`, concurrently; returns the runs.
async fn both_ways(url: &str, args: &[&str]) -> Vec<(String, Run)> {
    let mut flag = vec!["--database-url", url];
    flag.extend_from_slice(args);
    let by_env = [("RUST_LOG", "debug"), ("TXBOX_DATABASE_URL", url)];
    let (a, b) = tokio::join!(txbox(&flag, &by_env[..1]), txbox(args, &by_env));
    vec![
        (format!("--database-url {url} {args:?}"), a),
        (format!("TXBOX_DATABASE_URL={url} {args:?}"), b),
    ]
}

fn assert_no_password(what: &str, run: &Run) {
    run.assert_hides(what, PASSWORD);
}

fn assert_refused(what: &str, run: &Run, says: &str) {
    run.assert_hides(what, PASSWORD);
    run.assert_refused(what, says);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_password_is_never_shown() {
    let db = TestDb::new().await;
    let refusing = RefusingPg::start().await;
    let dead = format!("127.0.0.1:{}", free_port());
    let refusing_host = format!("127.0.0.1:{}", refusing.port());
    let mut cases = Vec::new();
    for (host, user, says) in [
        (dead.as_str(), "postgres", "cannot connect to the database"),
        (
            refusing_host.as_str(),
            "postgres",
            "password authentication failed",
        ),
        (server(&db).as_str(), "no_such_role", "does not exist"),
    ] {
        for url in urls(host, db.name(), user) {
            let host = host.to_owned();
            cases.push(tokio::spawn(async move {
                (both_ways(&url, &["migrate", "status"]).await, says, host)
            }));
        }
    }
    for case in cases {
        let (runs, says, _) = case.await.unwrap();
        for (what, run) in runs {
            assert_refused(&what, &run, says);
        }
    }
    assert!(
        refusing.passwords().iter().all(|p| p == PASSWORD) && refusing.passwords().len() >= 4,
        "the password really was sent: {:?}",
        refusing.passwords()
    );
    // A good server (it trusts the connection; the password is still in
    // the URL): the commands work and show no password either.
    for url in urls(&server(&db), db.name(), "postgres") {
        for args in [&["migrate"][..], &["migrate", "status"], &["offsets"]] {
            for (what, run) in both_ways(&url, args).await {
                assert_no_password(&what, &run);
                assert_eq!(run.exit, Some(0), "{what}:\n{}", run.output);
            }
        }
    }
}

/// The schemas of `db`, sorted.
async fn schemas(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT nspname::text FROM pg_namespace ORDER BY 1")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_valid_schema_names_are_one_identifier_each() {
    let db = TestDb::new().await;
    sqlx::raw_sql("CREATE TABLE public.x (id int); INSERT INTO public.x VALUES (1);")
        .execute(db.pool())
        .await
        .unwrap();
    let sixty_three = format!("{}a", "é".repeat(31));
    assert_eq!(sixty_three.len(), 63);
    for name in [
        r#"weird"; DROP TABLE x; --"#,
        "with space",
        "ünïcødé 🚀",
        "UPPER",
        "txbox'; DROP SCHEMA txbox CASCADE; --",
        sixty_three.as_str(),
    ] {
        let before = schemas(&db).await;
        let run = txbox(
            &["--database-url", db.url(), "--schema", name, "migrate"],
            &[],
        )
        .await;
        assert_eq!(run.exit, Some(0), "migrate into {name:?}:\n{}", run.output);
        let mut want = before.clone();
        want.push(name.to_owned());
        want.sort();
        assert_eq!(
            schemas(&db).await,
            want,
            "{name:?}: that schema and no other"
        );
        let tables: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = $1")
                .bind(name)
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert!(
            tables >= 6,
            "{name:?}: the tables are in it, found {tables}"
        );
        // Read back through the same name, given by the environment.
        let run = txbox(
            &["--database-url", db.url(), "migrate", "status"],
            &[("TXBOX_SCHEMA", name)],
        )
        .await;
        assert_eq!(run.exit, Some(0), "status of {name:?}:\n{}", run.output);
        assert!(!run.output.contains("pending"), "{name:?}:\n{}", run.output);
    }
    let x: i64 = sqlx::query_scalar("SELECT count(*) FROM public.x")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(x, 1, "public.x is untouched");
    let txbox_tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'txbox'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(txbox_tables >= 6, "the default schema is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_names_postgres_cannot_hold_are_refused_before_any_write() {
    let db = TestDb::new().await;
    let before = schemas(&db).await;
    for name in ["", &"a".repeat(64), &"é".repeat(32)] {
        for args in [&["migrate"][..], &["migrate", "--dry-run"], &["status"]] {
            let mut all = vec!["--database-url", db.url(), "--schema", name];
            all.extend_from_slice(args);
            let run = txbox(&all, &[]).await;
            assert_refused(&format!("{name:?} {args:?}"), &run, "schema name");
        }
    }
    assert_eq!(schemas(&db).await, before, "no schema was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_and_negative_numbers_end_with_a_clear_error() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO txbox.inbox_offsets (consumer_group, topic, partition, next_offset, epoch)
         VALUES ('g', 't', 0, 7, 1)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let dead = format!("127.0.0.1:{}", free_port());
    // Status still reports what the database holds, says the lag is
    // unknown and why, and does not call that fine (exit 2).
    let run = txbox(
        &["--database-url", db.url(), "status", "--brokers", &dead],
        &[],
    )
    .await;
    assert!(
        run.exit == Some(2) && run.output.contains("lag unknown") && run.output.contains(&dead),
        "status with unreachable brokers: {:?} after {:?}:\n{}",
        run.exit,
        run.elapsed,
        run.output
    );
    let reset = [
        "offsets",
        "reset",
        "--group",
        "g",
        "--topic",
        "t",
        "--execute",
    ];
    for (args, says) in [
        (
            [&reset[..], &["--to-latest", "--brokers", &dead]].concat(),
            dead.as_str(),
        ),
        (
            [&reset[..], &["--to-offset=-5"]].concat(),
            "must be 0 or more",
        ),
        (vec!["dead-letters", "--limit=-1"], "invalid value"),
        (vec!["dead-letters", "--limit", "0"], "invalid value"),
        (vec!["status", "--hold-back-alert=-1s"], "invalid value"),
    ] {
        let mut all = vec!["--database-url", db.url()];
        all.extend_from_slice(&args);
        let run = txbox(&all, &[]).await;
        assert_refused(&format!("{args:?}"), &run, says);
    }
    let offsets: Vec<i64> = sqlx::query_scalar("SELECT next_offset FROM txbox.inbox_offsets")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(offsets, [7], "nothing was written");
}
