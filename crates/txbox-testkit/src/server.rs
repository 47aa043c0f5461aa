//! A private PostgreSQL server that a test can stop and start again.
//!
//! The shared test server (`TXBOX_TEST_DATABASE_URL`) serves every test in
//! parallel, so no test may stop it. A test that needs a real database
//! outage (the server going away and coming back, not only a cut network)
//! starts its own with [`PgServer::start`]: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port, trust authentication,
//! user `postgres`. [`PgServer::stop`] shuts it down the way a crash does
//! (`pg_ctl stop -m immediate`: every session is cut, no checkpoint), and
//! [`PgServer::restart`] brings it back on the same port with the same data.
//!
//! The binaries come from `TXBOX_PG_BINDIR`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's server package), else `PATH`. As
//! root the server runs as the `postgres` OS user (PostgreSQL refuses to run
//! as root). A watchdog stops the server and removes its directory when the
//! test process exits, even on a panic or SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A private PostgreSQL server, removed when dropped.
#[derive(Debug)]
pub struct PgServer {
    bindir: PathBuf,
    data: PathBuf,
    port: u16,
    os_user: Option<String>,
    watchdog: Option<std::process::Child>,
}

impl PgServer {
    /// Creates a cluster in a temporary directory and starts it.
    ///
    /// # Panics
    /// If no PostgreSQL server binaries are installed or the server does not
    /// start: the test needs one, and says so.
    pub async fn start() -> PgServer {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .expect("PgServer::start panicked")
    }

    fn start_blocking() -> PgServer {
        let bindir = find_bindir().unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries (initdb, pg_ctl): install Debian's postgresql \
                 package or set TXBOX_PG_BINDIR"
            )
        });
        let os_user = is_root().then(|| "postgres".to_owned());
        let data =
            std::env::temp_dir().join(format!("txbox-pgserver-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&data).expect("create server directory");
        if let Some(user) = &os_user {
            let status = Command::new("chown")
                .arg(user)
                .arg(&data)
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "chown {} to {user} failed",
                data.display()
            );
        }
        let port = crate::free_port();
        let mut server = PgServer {
            bindir,
            data,
            port,
            os_user,
            watchdog: None,
        };
        server.run(
            "initdb",
            &[
                "-D",
                &server.pgdata(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        server.watchdog = Some(server.spawn_watchdog());
        server.restart();
        server
    }

    /// A connection URL for `database` (`postgres` exists from the start).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The directory of the server's binaries (`pg_dump`, `pg_restore`,
    /// `psql` live there too).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server as a crash would: every session is cut, nothing is
    /// checkpointed (`pg_ctl stop -m immediate`). Returns once it is down.
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &["stop", "-D", &self.pgdata(), "-m", "immediate", "-w"],
        );
    }

    /// Starts the server (again), on the same port with the same data, and
    /// returns once it accepts connections (after crash recovery, if any).
    pub fn restart(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories='{}' \
             -c fsync=off -c max_connections=60 -c shared_buffers=32MB",
            self.port,
            self.pgdata()
        );
        let log = format!("{}/server.log", self.pgdata());
        self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                &self.pgdata(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
            ],
        );
    }

    fn pgdata(&self) -> String {
        self.data.join("data").display().to_string()
    }

    /// Runs a server binary (as the server's OS user) and waits for it.
    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program, args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let bin = self.bindir.join(program);
        let mut cmd = match &self.os_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args).current_dir("/");
        cmd
    }

    /// A shell that, once this process is gone, stops the server and
    /// removes its directory.
    fn spawn_watchdog(&self) -> std::process::Child {
        let stop = self.command(
            "pg_ctl",
            &["stop", "-D", &self.pgdata(), "-m", "immediate", "-w"],
        );
        let argv: Vec<String> = std::iter::once(stop.get_program())
            .chain(stop.get_args())
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect();
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; \
             {stop} >/dev/null 2>&1; rm -rf {dir}",
            parent = std::process::id(),
            stop = argv.join(" "),
            dir = shell_quote(&self.data.display().to_string()),
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server watchdog")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command(
                "pg_ctl",
                &["stop", "-D", &self.pgdata(), "-m", "immediate", "-w"],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn find_bindir() -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(d) = std::env::var("TXBOX_PG_BINDIR") {
        return Some(PathBuf::from(d)).filter(|d| has_tools(d));
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_tools(d))
        .collect();
    versioned.sort();
    if let Some((_, d)) = versioned.pop() {
        return Some(d);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    has_tools(&d).then_some(d)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
