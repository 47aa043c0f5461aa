//! Applying migrations explicitly, under a lock, with checksums.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::{Executor as _, PgConnection, PgPool};

use super::{Migration, Schema, MIGRATIONS};
use crate::error::{Error, MigrateError, Result};

/// Applies and inspects txbox's migrations in one schema.
///
/// `run` takes a transaction-scoped advisory lock (so two migrators at once
/// apply each migration once, and the lock also works through transaction
/// poolers), applies every pending migration in that one transaction, and
/// records each version with its checksum. It refuses to run when an applied
/// migration's checksum differs from the one compiled in.
///
/// Services call [`Migrator::verify`] at start; they never migrate.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox::Result<()> {
/// use txbox::{Migrator, Schema};
///
/// let migrator = Migrator::new(Schema::new("txbox")?);
/// for applied in migrator.run(&pool).await? {
///     println!("applied {} {}", applied.version, applied.name);
/// }
/// migrator.verify(&pool).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Migrator {
    schema: Schema,
    migrations: &'static [Migration],
}

/// Where one migration stands in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// Applied with the expected checksum.
    Applied {
        /// When it was applied.
        at: DateTime<Utc>,
    },
    /// Applied, but with a different checksum: the file was edited.
    Modified,
    /// Not applied yet.
    Pending,
    /// In the database but unknown to this binary (a newer txbox applied it).
    Unknown,
}

/// One line of `txbox migrate status`.
#[derive(Debug, Clone)]
pub struct MigrationStatus {
    /// Version.
    pub version: i64,
    /// Name.
    pub name: String,
    /// State in the database.
    pub state: MigrationState,
}

struct AppliedRow {
    version: i64,
    name: String,
    checksum: Vec<u8>,
    applied_at: DateTime<Utc>,
}

impl Migrator {
    /// A migrator for `schema` with the migrations this crate carries.
    pub fn new(schema: Schema) -> Self {
        Migrator {
            schema,
            migrations: MIGRATIONS,
        }
    }

    /// The schema this migrator manages.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The latest version this binary knows.
    pub fn latest_version(&self) -> i64 {
        self.migrations.last().map_or(0, |m| m.version)
    }

    /// Applies every pending migration; returns the ones applied.
    pub fn run<'a>(&'a self, pool: &'a PgPool) -> BoxFuture<'a, Result<Vec<Migration>>> {
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let conn: &mut PgConnection = &mut tx;
            self.lock(conn).await?;
            conn.execute(
                format!(
                    "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {t} (
                 version bigint PRIMARY KEY,
                 name text NOT NULL,
                 checksum bytea NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 execution_ms bigint NOT NULL
             );",
                    s = self.schema.quoted(),
                    t = self.history_table()
                )
                .as_str(),
            )
            .await?;
            let applied = self.applied(conn).await?;
            self.check_history(&applied)?;
            let pending = self.pending(&applied);
            for m in &pending {
                let started = std::time::Instant::now();
                conn.execute(format!("SET LOCAL search_path TO {}", self.schema.quoted()).as_str())
                    .await?;
                conn.execute(m.sql)
                    .await
                    .map_err(|source| MigrateError::Failed {
                        version: m.version,
                        name: m.name.to_owned(),
                        source,
                    })?;
                sqlx::query(&format!(
                "INSERT INTO {} (version, name, checksum, execution_ms) VALUES ($1, $2, $3, $4)",
                self.history_table()
            ))
                .bind(m.version)
                .bind(m.name)
                .bind(m.checksum())
                .bind(i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX))
                .execute(&mut *conn)
                .await?;
                tracing::info!(version = m.version, name = m.name, schema = %self.schema, "applied migration");
            }
            tx.commit().await?;
            Ok(pending)
        })
    }

    /// The SQL `run` would execute now, without executing it.
    pub fn dry_run<'a>(&'a self, pool: &'a PgPool) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let applied = self.applied(&mut tx).await?;
            tx.rollback().await?;
            self.check_history(&applied)?;
            let mut out = String::new();
            let pending = self.pending(&applied);
            if pending.is_empty() {
                out.push_str("-- nothing to apply\n");
            } else {
                out.push_str(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {};\n",
                    self.schema.quoted()
                ));
            }
            for m in pending {
                out.push_str(&format!(
                    "-- migration {} ({})\nSET LOCAL search_path TO {};\n{}\n",
                    m.version,
                    m.name,
                    self.schema.quoted(),
                    m.sql
                ));
            }
            Ok(out)
        })
    }

    /// Every known or applied migration with its state.
    pub fn status<'a>(&'a self, pool: &'a PgPool) -> BoxFuture<'a, Result<Vec<MigrationStatus>>> {
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let applied = self.applied(&mut tx).await?;
            tx.rollback().await?;
            let mut out: Vec<MigrationStatus> = self
                .migrations
                .iter()
                .map(|m| {
                    let state = match applied.iter().find(|a| a.version == m.version) {
                        None => MigrationState::Pending,
                        Some(a) if a.checksum == m.checksum() => {
                            MigrationState::Applied { at: a.applied_at }
                        }
                        Some(_) => MigrationState::Modified,
                    };
                    MigrationStatus {
                        version: m.version,
                        name: m.name.to_owned(),
                        state,
                    }
                })
                .collect();
            for a in &applied {
                if !self.migrations.iter().any(|m| m.version == a.version) {
                    out.push(MigrationStatus {
                        version: a.version,
                        name: a.name.clone(),
                        state: MigrationState::Unknown,
                    });
                }
            }
            Ok(out)
        })
    }

    /// Checks that every migration this library needs is applied unmodified.
    /// Services call this at start and refuse to run otherwise.
    pub fn verify<'a>(&'a self, pool: &'a PgPool) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let status = self.status(pool).await?;
            let mut problems = Vec::new();
            for s in &status {
                match s.state {
                    MigrationState::Applied { .. } | MigrationState::Unknown => {}
                    MigrationState::Pending => problems.push(format!(
                        "migration {} ({}) is not applied",
                        s.version, s.name
                    )),
                    MigrationState::Modified => problems.push(format!(
                        "migration {} ({}) differs from this library's",
                        s.version, s.name
                    )),
                }
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(Error::SchemaNotReady {
                    schema: self.schema.name().to_owned(),
                    reason: problems.join("; "),
                })
            }
        })
    }

    fn history_table(&self) -> String {
        self.schema.table("_txbox_migrations")
    }

    async fn lock(&self, conn: &mut PgConnection) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('txbox-migrate:' || $1, 0))")
            .bind(self.schema.name())
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn applied(&self, conn: &mut PgConnection) -> Result<Vec<AppliedRow>> {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(self.history_table())
            .fetch_one(&mut *conn)
            .await?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, String, Vec<u8>, DateTime<Utc>)> = sqlx::query_as(&format!(
            "SELECT version, name, checksum, applied_at FROM {} ORDER BY version",
            self.history_table()
        ))
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(version, name, checksum, applied_at)| AppliedRow {
                version,
                name,
                checksum,
                applied_at,
            })
            .collect())
    }

    fn check_history(&self, applied: &[AppliedRow]) -> Result<()> {
        for a in applied {
            match self.migrations.iter().find(|m| m.version == a.version) {
                None => return Err(MigrateError::Unknown { version: a.version }.into()),
                Some(m) if m.checksum() != a.checksum => {
                    return Err(MigrateError::Modified {
                        version: a.version,
                        name: a.name.clone(),
                    }
                    .into())
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn pending(&self, applied: &[AppliedRow]) -> Vec<Migration> {
        self.migrations
            .iter()
            .filter(|m| !applied.iter().any(|a| a.version == m.version))
            .copied()
            .collect()
    }
}
