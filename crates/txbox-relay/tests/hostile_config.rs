//! The `txbox-relay` binary and library under hostile configuration:
//! passwords in database URLs (user info or `?password=`, by flag or
//! `TXBOX_DATABASE_URL`) against an unreachable host, a server refusing the
//! password, a missing role and a good server, never shown; zero, negative
//! and out-of-range sizes and intervals and unusable schema names refused
//! before any connection; an odd but valid schema name working end to end.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use txbox::{Migrator, Outbox, Schema};
use txbox_relay::Mode;
use txbox_testkit::process::{run_for, Run};
use txbox_testkit::{free_port, unique_name, RefusingPg, TestDb};

const PASSWORD: &str = "pw-relay-hostile-51d0";

async fn relay(args: &[&str], envs: &[(&str, &str)], within: Duration) -> Run {
    let mut envs = envs.to_vec();
    envs.push(("RUST_LOG", "debug"));
    run_for(
        Path::new(env!("CARGO_BIN_EXE_txbox-relay")),
        args,
        &envs,
        within,
    )
    .await
}

/// How a run is started: (what, args, env).
type Way = (String, Vec<String>, Vec<(String, String)>);

/// `host:port` of the test server.
fn server(db: &TestDb) -> String {
    let after = db.url().split_once('@').map_or(db.url(), |p| p.1);
    after.split('/').next().unwrap().to_owned()
}

/// Both ways of passing each URL form carrying [`PASSWORD`]: (what, args,
/// env) to run with `brokers`.
fn ways(host: &str, db: &str, user: &str, brokers: &str) -> Vec<Way> {
    let mut out = Vec::new();
    for url in [
        format!("postgres://{user}:{PASSWORD}@{host}/{db}"),
        format!("postgres://{host}/{db}?user={user}&password={PASSWORD}"),
    ] {
        let base = vec!["--brokers".to_owned(), brokers.to_owned()];
        let mut flag = base.clone();
        flag.extend(["--database-url".to_owned(), url.clone()]);
        out.push((format!("--database-url {url}"), flag, vec![]));
        out.push((
            format!("TXBOX_DATABASE_URL={url}"),
            base,
            vec![("TXBOX_DATABASE_URL".to_owned(), url)],
        ));
    }
    out
}

/// Runs every way concurrently for at most `within`.
async fn run_all(ways: Vec<Way>, within: Duration) -> Vec<(String, Run)> {
    let tasks: Vec<_> = ways
        .into_iter()
        .map(|(what, args, envs)| {
            tokio::spawn(async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let envs: Vec<(&str, &str)> =
                    envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                (what, relay(&args, &envs, within).await)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn assert_no_password(what: &str, run: &Run) {
    run.assert_hides(what, PASSWORD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_password_is_never_shown() {
    let db = TestDb::new().await;
    let refusing = RefusingPg::start().await;
    let dead_db = format!("127.0.0.1:{}", free_port());
    let dead_brokers = format!("127.0.0.1:{}", free_port());
    let refusing_host = format!("127.0.0.1:{}", refusing.port());
    let good = server(&db);

    // Refused for good: a non-zero exit, soon, saying why.
    for (host, user, says) in [
        (
            refusing_host.as_str(),
            "postgres",
            "password authentication failed",
        ),
        (good.as_str(), "no_such_role", "does not exist"),
    ] {
        for (what, run) in run_all(
            ways(host, db.name(), user, &dead_brokers),
            Duration::from_secs(30),
        )
        .await
        {
            assert_no_password(&what, &run);
            run.assert_refused(&what, says);
        }
    }
    assert_eq!(
        refusing.passwords(),
        vec![PASSWORD.to_owned(); refusing.passwords().len().max(4)],
        "the password really was sent"
    );

    // An unreachable database is waited for (the relay is a service): it
    // says so, retries, and stops on SIGTERM; a good database with
    // unreachable brokers likewise. Neither shows the password.
    let mut waiting = ways(&dead_db, db.name(), "postgres", &dead_brokers);
    waiting.extend(ways(&good, db.name(), "postgres", &dead_brokers));
    let within = Duration::from_secs(13);
    for (i, (what, run)) in run_all(waiting, within).await.into_iter().enumerate() {
        assert_no_password(&what, &run);
        assert_eq!(run.exit, None, "{what}: still running:\n{}", run.output);
        assert!(
            run.elapsed < within + Duration::from_secs(9),
            "{what}: stops on SIGTERM, took {:?}:\n{}",
            run.elapsed,
            run.output
        );
        assert!(
            run.output.contains("relay stopped"),
            "{what}: a clean stop:\n{}",
            run.output
        );
        if i < 4 {
            assert!(
                run.output.contains("database unavailable; retrying"),
                "{what}:\n{}",
                run.output
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_refused_before_connecting() {
    let refusing = RefusingPg::start().await;
    let url = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/db",
        refusing.port()
    );
    let brokers = format!("127.0.0.1:{}", free_port());
    let long_schema = "a".repeat(64);
    let long_unicode = "é".repeat(32);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--batch-size", "0"], "batch_size"),
        (vec!["--batch-size", "100001"], "batch_size"),
        (vec!["--batch-size=-1"], "--batch-size"),
        (vec!["--poll-interval", "0s"], "poll_interval"),
        (vec!["--poll-interval", "0"], "--poll-interval"),
        (vec!["--poll-interval=-1s"], "--poll-interval"),
        (vec!["--lease-ttl", "0s"], "lease_ttl"),
        (vec!["--lease-ttl", "500ms"], "lease_ttl"),
        (vec!["--lease-ttl=-5s"], "--lease-ttl"),
        (vec!["--streams=-1"], "must not be negative"),
        (vec!["--streams", "0,0"], "twice"),
        (vec!["--prune-batch", "0"], "prune_batch"),
        (vec!["--prune-interval", "0s"], "prune_interval"),
        (vec!["--schema", ""], "schema name"),
        (vec!["--schema", &long_schema], "schema name"),
        (vec!["--schema", &long_unicode], "schema name"),
        (vec!["--position-topic", "a b"], "position_topic"),
        (
            vec!["--kafka-option", "enable.idempotence=false"],
            "enable.idempotence",
        ),
    ];
    for (extra, says) in cases {
        let mut args = vec!["--database-url", url.as_str(), "--brokers", &brokers];
        args.extend_from_slice(&extra);
        let run = relay(&args, &[], Duration::from_secs(20)).await;
        assert_no_password(&format!("{extra:?}"), &run);
        run.assert_refused(&format!("{extra:?}"), says);
    }
    // A configuration file can hold what a command line cannot: a NUL.
    let dir = std::env::temp_dir().join(unique_name("relay-hostile"));
    std::fs::create_dir_all(&dir).unwrap();
    for (toml, says) in [
        ("schema = \"a\\u0000b\"", "schema name"),
        ("batch_size = -1", "batch_size"),
        ("poll_interval = \"0s\"", "poll_interval"),
    ] {
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            format!("database_url = '{url}'\nbrokers = '{brokers}'\n{toml}\n"),
        )
        .unwrap();
        let run = relay(
            &["--config", file.to_str().unwrap()],
            &[],
            Duration::from_secs(20),
        )
        .await;
        assert_no_password(toml, &run);
        run.assert_refused(toml, says);
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        refusing.passwords().is_empty(),
        "refused before connecting, yet connections were made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_an_oddly_named_schema_publishes() {
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    let name = r#"weird"; DROP TABLE x; -- ü"#;
    let schema = Schema::new(name).unwrap();
    sqlx::raw_sql("CREATE TABLE public.x (id int); INSERT INTO public.x VALUES (1);")
        .execute(db.pool())
        .await
        .unwrap();
    Migrator::new(schema.clone()).run(db.pool()).await.unwrap();
    let topic = broker.topic("weird-schema", 1).await;
    let outbox = Outbox::new(schema.clone());
    let mut tx = db.pool().begin().await.unwrap();
    outbox
        .stage_all(&mut tx, (0..5).map(|i| common::event(&topic, "k", 0, i)))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut config = common::config(&db, broker.bootstrap(), Mode::ExactlyOnce);
    config.schema = name.to_owned();
    let relay = common::Relay::start(config);
    let seen = common::consume(broker.bootstrap(), &topic, 5, true).await;
    assert_eq!(seen.len(), 5, "published from the oddly named schema");
    let report = relay.stop().await;
    assert_eq!(report.published(), 5);
    let x: i64 = sqlx::query_scalar("SELECT count(*) FROM public.x")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(x, 1, "public.x is untouched");
    let default_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM txbox.outbox")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(default_rows, 0, "nothing went to the default schema");
}
