//! The chain's processes and servers, and what the controller does to them.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use payments_example::check::{self, Report};
use payments_example::events::{PARTITIONS, REQUESTED, SETTLED};
use payments_example::{LEDGER_GROUP, LEDGER_SCHEMA, PAYMENTS_GROUP};
use sqlx::PgPool;
use txbox::{Migrator, Schema};
use txbox_testkit::process::Child;
use txbox_testkit::{KafkaServer, PgServer};

use crate::faults::{Kind, Service};

/// The classic protocol's session timeout the services run with: a killed
/// instance's partitions move on after this long.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// The binaries, found beside this one (one `cargo build` makes them all).
#[derive(Debug)]
struct Bins {
    payments: PathBuf,
    ledger: PathBuf,
    relay: PathBuf,
}

impl Bins {
    fn find() -> anyhow::Result<Bins> {
        let me = std::env::current_exe()?;
        let dir = me.parent().context("the binary's folder")?;
        // A test binary lives one level down, in deps/.
        let dirs = [dir.to_path_buf(), dir.join("..")];
        let find = |name: &str| {
            dirs.iter()
                .map(|d| d.join(name))
                .find(|p| p.exists())
                .with_context(|| {
                    format!(
                        "{name} is not built beside {}: run `cargo build -p txbox-relay -p \
                         payments-example -p txbox-chaos` first",
                        me.display()
                    )
                })
        };
        Ok(Bins {
            payments: find("payments-example")?,
            ledger: find("ledger-example")?,
            relay: find("txbox-relay")?,
        })
    }
}

/// A process of the chain and how to start it again.
#[derive(Debug)]
struct Running {
    child: Child,
    program: PathBuf,
    args: Vec<String>,
    starts: u32,
}

/// Progress read from the databases.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress {
    /// Time since the run started.
    pub(crate) at: Duration,
    /// Settlements in the payments service.
    pub(crate) settled: i64,
    /// Ledger entries.
    pub(crate) ledger: i64,
    /// Outbox rows not yet published.
    pub(crate) unpublished: i64,
}

impl Progress {
    /// Nothing done, at the start.
    pub(crate) fn zero() -> Progress {
        Progress {
            at: Duration::ZERO,
            settled: 0,
            ledger: 0,
            unpublished: 0,
        }
    }
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} settled, {} unpublished, {} in the ledger",
            self.settled, self.unpublished, self.ledger
        )
    }
}

/// What the databases say at the end.
#[derive(Debug)]
pub(crate) struct Verdict {
    pub(crate) report: Report,
    pub(crate) duplicates_payments: i64,
    pub(crate) duplicates_ledger: i64,
    pub(crate) problems: Vec<String>,
}

/// The running chain.
#[derive(Debug)]
pub(crate) struct Chain {
    pg: PgServer,
    kafka: KafkaServer,
    pool: PgPool,
    url: String,
    prefix: String,
    seed: u64,
    relay_mode: String,
    bins: Bins,
    logs: PathBuf,
    procs: BTreeMap<Service, Running>,
    kills: BTreeMap<Service, u32>,
    exits: BTreeMap<Service, u32>,
    freezes: u32,
    kafka_restarts: u32,
    postgres_restarts: u32,
}

impl Chain {
    /// Starts the servers, applies the schemas, creates the topics and
    /// starts the four processes.
    pub(crate) async fn start(seed: u64, relay_mode: &str, logs: &Path) -> anyhow::Result<Chain> {
        let bins = Bins::find()?;
        let pg = PgServer::start().await;
        let admin = PgPool::connect(&pg.url("postgres")).await?;
        sqlx::query("CREATE DATABASE chaos").execute(&admin).await?;
        admin.close().await;
        let url = pg.url("chaos");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        Migrator::new(Schema::default()).run(&pool).await?;
        Migrator::new(Schema::new(LEDGER_SCHEMA)?)
            .run(&pool)
            .await?;
        let kafka = KafkaServer::start().await;
        let prefix = format!("chaos-{seed}.");
        let broker = kafka.broker();
        for topic in [REQUESTED, SETTLED] {
            broker
                .create_topic(&format!("{prefix}{topic}"), PARTITIONS)
                .await;
        }
        let mut chain = Chain {
            pg,
            kafka,
            pool,
            url,
            prefix,
            seed,
            relay_mode: relay_mode.to_owned(),
            bins,
            logs: logs.to_owned(),
            procs: BTreeMap::new(),
            kills: BTreeMap::new(),
            exits: BTreeMap::new(),
            freezes: 0,
            kafka_restarts: 0,
            postgres_restarts: 0,
        };
        for service in [
            Service::Payments(0),
            Service::Payments(1),
            Service::Relay,
            Service::Ledger,
        ] {
            let (program, args) = chain.command(service);
            let child = chain.spawn(&program, &args);
            chain.procs.insert(
                service,
                Running {
                    child,
                    program,
                    args,
                    starts: 1,
                },
            );
        }
        // Ready when both inboxes hold partitions and the relay runs.
        for (service, line) in [
            (Service::Payments(0), "partition claimed"),
            (Service::Ledger, "partition claimed"),
            (Service::Relay, "relay starting"),
        ] {
            if let Some(r) = chain.procs.get(&service) {
                anyhow::ensure!(
                    r.child.wait_for_stderr(line, Duration::from_secs(60)).await
                        || chain.procs.get(&Service::Payments(1)).is_some_and(|p| {
                            service == Service::Payments(0) && p.child.stderr_contains(line)
                        }),
                    "{service} did not start within 60 s:\n{}",
                    r.child.stderr()
                );
            }
        }
        Ok(chain)
    }

    /// The broker's bootstrap address.
    pub(crate) fn brokers(&self) -> String {
        self.kafka.bootstrap().to_owned()
    }

    /// The input topic.
    pub(crate) fn requested(&self) -> String {
        format!("{}{REQUESTED}", self.prefix)
    }

    fn command(&self, service: Service) -> (PathBuf, Vec<String>) {
        let session = format!("session.timeout.ms={}", SESSION_TIMEOUT.as_millis());
        let inbox = |bin: &Path| {
            let args = [
                "--database-url",
                &self.url,
                "--brokers",
                self.kafka.bootstrap(),
                "--kafka-option",
                &session,
                "--kafka-option",
                "heartbeat.interval.ms=1000",
            ];
            (
                bin.to_owned(),
                args.iter().map(|s| (*s).to_owned()).collect(),
            )
        };
        match service {
            Service::Payments(_) => inbox(&self.bins.payments),
            Service::Ledger => inbox(&self.bins.ledger),
            Service::Relay => {
                let positions = format!("{}txbox-positions", self.prefix);
                let txn = format!("chaos-{}", self.seed);
                let args = [
                    "--database-url",
                    &self.url,
                    "--brokers",
                    self.kafka.bootstrap(),
                    "--mode",
                    &self.relay_mode,
                    "--poll-interval",
                    "50ms",
                    "--lease-ttl",
                    "3s",
                    "--position-topic",
                    &positions,
                    "--transactional-id-prefix",
                    &txn,
                ];
                (
                    self.bins.relay.clone(),
                    args.iter().map(|s| (*s).to_owned()).collect(),
                )
            }
        }
    }

    fn spawn(&self, program: &Path, args: &[String]) -> Child {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Child::spawn(
            program,
            &args,
            &[
                ("TXBOX_DEMO_TOPIC_PREFIX", &self.prefix),
                ("RUST_LOG", "info"),
            ],
        )
    }

    /// Appends `service`'s log of its current start to its log file.
    fn save_log(&self, service: Service) {
        let Some(running) = self.procs.get(&service) else {
            return;
        };
        let path = self.logs.join(format!("{service}.log"));
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = writeln!(
                f,
                "===== start {} =====\n{}",
                running.starts,
                running.child.stderr()
            );
        }
    }

    /// Starts `service` again, with the arguments it had.
    fn respawn(&mut self, service: Service) {
        self.save_log(service);
        let Some((program, args)) = self
            .procs
            .get(&service)
            .map(|r| (r.program.clone(), r.args.clone()))
        else {
            return;
        };
        let child = self.spawn(&program, &args);
        if let Some(running) = self.procs.get_mut(&service) {
            running.child = child;
            running.starts += 1;
        }
    }

    /// Restarts every process that exited on its own (a service may give
    /// up at start while the database or the broker is down), counting it.
    pub(crate) async fn supervise(&mut self) {
        let exited: Vec<Service> = self
            .procs
            .iter_mut()
            .filter_map(|(s, r)| r.child.has_exited().then_some(*s))
            .collect();
        for service in exited {
            *self.exits.entry(service).or_default() += 1;
            println!("         {service} exited on its own; starting it again");
            self.respawn(service);
        }
    }

    /// Does `kind` to the chain.
    pub(crate) async fn inject(&mut self, kind: &Kind) -> anyhow::Result<()> {
        match kind {
            Kind::Kill { service, down } => {
                if let Some(r) = self.procs.get_mut(service) {
                    r.child.kill().await;
                }
                *self.kills.entry(*service).or_default() += 1;
                tokio::time::sleep(*down).await;
                self.respawn(*service);
            }
            Kind::Freeze { service } => {
                if let Some(r) = self.procs.get(service) {
                    r.child.freeze();
                    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
                    r.child.thaw();
                }
                self.freezes += 1;
            }
            Kind::RestartKafka => {
                self.kafka.kill().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.kafka.restart().await;
                self.kafka_restarts += 1;
            }
            Kind::RestartPostgres => {
                tokio::task::block_in_place(|| self.pg.stop());
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::block_in_place(|| self.pg.restart());
                self.postgres_restarts += 1;
            }
        }
        Ok(())
    }

    /// Reads progress (zeros while the database is away).
    pub(crate) async fn progress(&self, started: Instant) -> Progress {
        self.read_progress(started).await.unwrap_or(Progress {
            at: started.elapsed(),
            ..Progress::zero()
        })
    }

    async fn read_progress(&self, started: Instant) -> sqlx::Result<Progress> {
        let (settled, ledger, unpublished): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM payments_settlements),
                    (SELECT count(*) FROM ledger_entries),
                    (SELECT count(*) FROM txbox.outbox o LEFT JOIN txbox.relay_streams r USING (stream)
                      WHERE r.stream IS NULL OR (o.txid, o.id) > (r.position_txid, r.position_id))",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Progress {
            at: started.elapsed(),
            settled,
            ledger,
            unpublished,
        })
    }

    /// Waits until every event is settled, published and in the ledger.
    pub(crate) async fn settle(
        &mut self,
        events: u64,
        timeout: Duration,
        started: Instant,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let want = i64::try_from(events).unwrap_or(i64::MAX);
        let mut last_print = Instant::now();
        loop {
            self.supervise().await;
            let p = self.progress(started).await;
            if p.settled >= want && p.ledger >= want && p.unpublished == 0 {
                println!("[{:>4.0}s] settled: {p}", p.at.as_secs_f64());
                // Let duplicates in flight, if any, arrive to be seen.
                tokio::time::sleep(Duration::from_secs(2)).await;
                return true;
            }
            if Instant::now() >= deadline {
                println!("[{:>4.0}s] not settled: {p}", p.at.as_secs_f64());
                return false;
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                println!("[{:>4.0}s] {p}", p.at.as_secs_f64());
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops every process (SIGTERM, then SIGKILL after 30 s) and keeps
    /// their logs.
    pub(crate) async fn stop(&mut self) {
        for r in self.procs.values() {
            r.child.terminate();
        }
        for r in self.procs.values_mut() {
            if tokio::time::timeout(Duration::from_secs(30), r.child.wait())
                .await
                .is_err()
            {
                r.child.kill().await;
            }
        }
        let services: Vec<Service> = self.procs.keys().copied().collect();
        for s in services {
            self.save_log(s);
        }
    }

    /// Checks the databases.
    pub(crate) async fn verdict(&self, events: u64) -> anyhow::Result<Verdict> {
        let payments_schema = Schema::default();
        let ledger_schema = Schema::new(LEDGER_SCHEMA)?;
        let report = Report::read(check::Chain {
            payments: &self.pool,
            payments_schema: &payments_schema,
            ledger: &self.pool,
            ledger_schema: &ledger_schema,
            ledger_group: LEDGER_GROUP,
        })
        .await?;
        let mut problems = report.problems(events);
        let progress = self.read_progress(Instant::now()).await?;
        if progress.unpublished != 0 {
            problems.push(format!(
                "{} outbox rows left unpublished",
                progress.unpublished
            ));
        }
        let relay_dead: i64 = sqlx::query_scalar("SELECT count(*) FROM txbox.relay_dead_letters")
            .fetch_one(&self.pool)
            .await?;
        if relay_dead != 0 {
            problems.push(format!("{relay_dead} relay dead letters"));
        }
        let duplicates = |schema: &'static str, group: &'static str| {
            let pool = self.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(&format!(
                    "SELECT COALESCE(sum(duplicates), 0)::bigint FROM {schema}.inbox_offsets
                      WHERE consumer_group = $1"
                ))
                .bind(group)
                .fetch_one(&pool)
                .await
            }
        };
        Ok(Verdict {
            report,
            duplicates_payments: duplicates("txbox", PAYMENTS_GROUP).await?,
            duplicates_ledger: duplicates("ledger", LEDGER_GROUP).await?,
            problems,
        })
    }

    /// The faults injected, per process and kind.
    pub(crate) fn fault_counts(&self) -> String {
        let per = |m: &BTreeMap<Service, u32>| {
            m.iter()
                .map(|(s, n)| format!("{s}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "kills [{}], unplanned exits [{}], freezes {}, broker restarts {}, postgres restarts {}",
            per(&self.kills),
            per(&self.exits),
            self.freezes,
            self.kafka_restarts,
            self.postgres_restarts
        )
    }
}
