//! A database per test.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;

/// A fresh database on the test server, with txbox's migrations applied in
/// schema `txbox`, dropped (with its connections) when this value drops.
#[derive(Debug)]
pub struct TestDb {
    pool: PgPool,
    url: String,
    name: String,
    admin_url: String,
    schema: txbox::Schema,
}

/// The server tests create databases on.
pub fn admin_url() -> String {
    std::env::var("TXBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

impl TestDb {
    /// Creates and migrates a fresh database.
    ///
    /// # Panics
    /// If the test server cannot be reached: tests need it.
    pub async fn new() -> TestDb {
        Self::with_pool_size(20).await
    }

    /// Like [`TestDb::new`] with a pool of `size` connections.
    pub async fn with_pool_size(size: u32) -> TestDb {
        let admin_url = admin_url();
        let name = format!("txbox_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot reach the test database server at {admin_url}: {e}")
            });
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let opts = PgConnectOptions::from_str(&admin_url)
            .expect("TXBOX_TEST_DATABASE_URL parses")
            .database(&name)
            .log_statements(tracing::log::LevelFilter::Trace);
        let url = opts.to_url_lossy().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .connect_with(opts)
            .await
            .expect("connect to test database");
        let schema = txbox::Schema::default();
        txbox::Migrator::new(schema.clone())
            .run(&pool)
            .await
            .expect("migrate test database");
        TestDb {
            pool,
            url,
            name,
            admin_url,
            schema,
        }
    }

    /// A pool on the database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The database's URL (for child processes).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The txbox schema (migrated).
    pub fn schema(&self) -> &txbox::Schema {
        &self.schema
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}
