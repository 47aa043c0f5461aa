//! A PostgreSQL-protocol proxy that can lose the reply to one `COMMIT`: the
//! server commits, the client never hears so and sees its connection
//! closed. This is the window where a client cannot know whether its
//! transaction landed, made exact.
//!
//! The proxy reads the frontend protocol (version 3) of each connection:
//! the startup packet, then messages of a type byte and an `int32` length.
//! It remembers the SQL of every prepared statement (`Parse`) by name, so
//! a statement executed again through `Bind` alone (sqlx caches prepared
//! statements per connection) is still recognised, and it reads simple
//! `Query` messages (sqlx sends `BEGIN` and `COMMIT` that way). An
//! `SSLRequest` or `GSSENCRequest` is answered "no" by the proxy itself, so
//! clients must connect with `sslmode=disable` or `prefer`
//! ([`PgProxy::connect_options`] sets `disable`).
//!
//! Armed with [`PgProxy::arm_commit_cut`], the proxy waits for a
//! transaction that executes a statement containing the given text. At
//! that transaction's `COMMIT` it stops relaying the server's replies on
//! that connection, closes the client's side, forwards the `COMMIT`, reads
//! the server's answer (recorded as a [`CommitCut`]) and ends the server
//! session. Other connections are untouched, and the proxy disarms after
//! one cut.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// Startup-phase request codes that ask for encryption before startup.
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
/// The largest message the proxy accepts (PostgreSQL's own limit is 1 GB).
const MAX_MESSAGE: usize = 1 << 30;
/// How long the proxy waits for the server's answer to a cut `COMMIT`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server answered to a `COMMIT` whose reply the proxy withheld.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitReply {
    /// `CommandComplete` with the tag `COMMIT`: the transaction is durable.
    Committed,
    /// `CommandComplete` with another tag (`ROLLBACK`: the transaction had
    /// failed before the `COMMIT`).
    Tag(String),
    /// `ErrorResponse`, with its message.
    Error(String),
    /// The server closed the connection, or did not answer within 30 s.
    NoAnswer,
}

/// One connection cut after its `COMMIT` reached the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitCut {
    /// The SQL of the statement that matched the armed text.
    pub statement: String,
    /// The server's answer to the `COMMIT`, which the client never saw.
    pub reply: CommitReply,
}

#[derive(Debug, Default)]
struct State {
    /// The text a statement must contain for its transaction's `COMMIT` to
    /// be cut; `None` when disarmed.
    armed: Option<String>,
    cuts: Vec<CommitCut>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cut: Notify,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A loopback proxy to one PostgreSQL server that can lose one `COMMIT`'s
/// reply (see the module documentation).
#[derive(Debug)]
pub struct PgProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    /// Starts a proxy to the server at `upstream` (`host:port`) on a free
    /// loopback port.
    ///
    /// # Panics
    /// If no port can be bound.
    pub async fn start(upstream: &str) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind PostgreSQL proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared::default());
        let upstream = upstream.to_owned();
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        // An I/O error ends the connection, as a network
                        // failure would: the client sees it closed.
                        let _ = relay_connection(client, server, &s).await;
                    }
                });
            }
        });
        PgProxy {
            port,
            shared,
            accept,
        }
    }

    /// Starts a proxy to the server a `postgres://` URL names.
    ///
    /// # Panics
    /// If the URL does not parse or names a Unix socket, or no port can be
    /// bound.
    pub async fn start_for(url: &str) -> PgProxy {
        let opts = PgConnectOptions::from_str(url).expect("a postgres:// URL");
        let host = opts.get_host();
        assert!(
            !host.starts_with('/'),
            "the proxy needs a TCP server, not the Unix socket {host}"
        );
        PgProxy::start(&format!("{host}:{}", opts.get_port())).await
    }

    /// The local port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection options for the database of `url`, through this proxy,
    /// with `sslmode=disable`.
    ///
    /// # Panics
    /// If the URL does not parse.
    pub fn connect_options(&self, url: &str) -> PgConnectOptions {
        PgConnectOptions::from_str(url)
            .expect("a postgres:// URL")
            .host("127.0.0.1")
            .port(self.port)
            .ssl_mode(PgSslMode::Disable)
    }

    /// Arms one cut: the next `COMMIT` of a transaction that executed a
    /// statement containing `statement_contains` reaches the server, and
    /// the client's connection is closed before any reply. Statements run
    /// before the call do not count. Arming again replaces the text.
    pub fn arm_commit_cut(&self, statement_contains: &str) {
        self.shared.state().armed = Some(statement_contains.to_owned());
    }

    /// True while a cut is armed and has not happened.
    pub fn is_armed(&self) -> bool {
        self.shared.state().armed.is_some()
    }

    /// Every cut so far, in order.
    pub fn cuts(&self) -> Vec<CommitCut> {
        self.shared.state().cuts.clone()
    }

    /// Waits until at least one cut has happened and returns the first, or
    /// `None` after `timeout`.
    pub async fn wait_for_cut(&self, timeout: Duration) -> Option<CommitCut> {
        let wait = async {
            loop {
                let notified = self.shared.cut.notified();
                if let Some(cut) = self.shared.state().cuts.first().cloned() {
                    return cut;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        // Open connections live on with their clients; no new ones.
        self.accept.abort();
    }
}

/// Relays one connection until either side closes it, or until it is cut.
async fn relay_connection(
    mut client: TcpStream,
    mut server: TcpStream,
    shared: &Shared,
) -> std::io::Result<()> {
    startup(&mut client, &mut server).await?;
    let (mut cr, cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let (stop, stopped) = oneshot::channel();
    let backend = tokio::spawn(server_to_client(sr, cw, stopped));
    let mut stop = Some((stop, backend));
    let mut tx = Transaction::default();
    while let Some((kind, body)) = read_message(&mut cr).await? {
        if kind == b'Q' && is_commit(&cstr(&body, 0).0) {
            if let Some(statement) = tx.take_cut(shared) {
                let Some((stop, backend)) = stop.take() else {
                    return Ok(());
                };
                // No reply may reach the client from here on.
                let _ = stop.send(());
                let halves = backend.await.ok().flatten();
                drop(cr);
                let reply = match halves {
                    Some((mut sr, cw)) => {
                        drop(cw);
                        write_message(&mut sw, kind, &body).await?;
                        let reply = tokio::time::timeout(REPLY_TIMEOUT, read_commit_reply(&mut sr))
                            .await
                            .unwrap_or(CommitReply::NoAnswer);
                        // Terminate: the server ends the session.
                        let _ = write_message(&mut sw, b'X', &[]).await;
                        reply
                    }
                    None => CommitReply::NoAnswer,
                };
                shared.state().cuts.push(CommitCut { statement, reply });
                shared.cut.notify_waiters();
                return Ok(());
            }
        }
        tx.observe(kind, &body, shared);
        write_message(&mut sw, kind, &body).await?;
    }
    Ok(())
}

/// Relays the untyped startup packets. An encryption request is answered
/// "no" by the proxy (it must read the traffic), then the client sends its
/// `StartupMessage`, which is forwarded.
async fn startup(client: &mut TcpStream, server: &mut TcpStream) -> std::io::Result<()> {
    loop {
        let len = usize::try_from(client.read_i32().await?).unwrap_or(0);
        if !(8..=MAX_MESSAGE).contains(&len) {
            return Err(invalid("startup packet length"));
        }
        let mut body = vec![0; len - 4];
        client.read_exact(&mut body).await?;
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        if code == SSL_REQUEST || code == GSSENC_REQUEST {
            client.write_all(b"N").await?;
            continue;
        }
        server
            .write_i32(i32::try_from(len).unwrap_or(i32::MAX))
            .await?;
        server.write_all(&body).await?;
        return Ok(());
    }
}

/// Copies the server's bytes to the client until either closes, or until
/// `stop` fires; then hands both halves back (nothing more is relayed).
async fn server_to_client(
    mut sr: OwnedReadHalf,
    mut cw: OwnedWriteHalf,
    mut stop: oneshot::Receiver<()>,
) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return Some((sr, cw)),
            n = sr.read(&mut buf) => match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return None;
                    }
                }
            },
        }
    }
}

/// What the proxy knows of the transaction open on one connection.
#[derive(Debug, Default)]
struct Transaction {
    /// Prepared statements by name (`""` is the unnamed one).
    statements: HashMap<String, String>,
    /// The SQL of an executed statement that matched the armed text.
    matched: Option<String>,
}

impl Transaction {
    fn observe(&mut self, kind: u8, body: &[u8], shared: &Shared) {
        match kind {
            b'P' => {
                let (name, rest) = cstr(body, 0);
                let (sql, _) = cstr(body, rest);
                self.statements.insert(name, sql);
            }
            b'B' => {
                let (_portal, rest) = cstr(body, 0);
                let (name, _) = cstr(body, rest);
                if let Some(sql) = self.statements.get(&name).cloned() {
                    self.executed(sql, shared);
                }
            }
            b'Q' => {
                let (sql, _) = cstr(body, 0);
                if ends_transaction(&sql) || starts_transaction(&sql) {
                    self.matched = None;
                } else {
                    self.executed(sql, shared);
                }
            }
            b'C' if body.first() == Some(&b'S') => {
                let (name, _) = cstr(body, 1);
                self.statements.remove(&name);
            }
            _ => {}
        }
    }

    fn executed(&mut self, sql: String, shared: &Shared) {
        let armed = shared.state().armed.clone();
        if self.matched.is_none() && armed.is_some_and(|text| sql.contains(&text)) {
            self.matched = Some(sql);
        }
    }

    /// At a `COMMIT`: the matched statement, if this transaction is to be
    /// cut (disarming the proxy).
    fn take_cut(&mut self, shared: &Shared) -> Option<String> {
        let statement = self.matched.take()?;
        let mut state = shared.state();
        state.armed.take().map(|_| statement)
    }
}

fn words(sql: &str) -> Vec<String> {
    sql.trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect()
}

fn is_commit(sql: &str) -> bool {
    let words = words(sql);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        words[..],
        ["COMMIT" | "END"] | ["COMMIT" | "END", "WORK" | "TRANSACTION"]
    )
}

fn ends_transaction(sql: &str) -> bool {
    is_commit(sql)
        || words(sql)
            .first()
            .is_some_and(|w| w == "ROLLBACK" || w == "ABORT")
}

fn starts_transaction(sql: &str) -> bool {
    words(sql)
        .first()
        .is_some_and(|w| w == "BEGIN" || w == "START")
}

/// The NUL-terminated string at `at`, and where the next field starts.
fn cstr(body: &[u8], at: usize) -> (String, usize) {
    let rest = body.get(at..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    (
        String::from_utf8_lossy(&rest[..end]).into_owned(),
        at + end + 1,
    )
}

/// Reads one typed message; `None` at a clean end of stream.
async fn read_message(r: &mut OwnedReadHalf) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let kind = match r.read_u8().await {
        Ok(k) => k,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(r.read_i32().await?).unwrap_or(0);
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(invalid("message length"));
    }
    let mut body = vec![0; len - 4];
    r.read_exact(&mut body).await?;
    Ok(Some((kind, body)))
}

async fn write_message(w: &mut OwnedWriteHalf, kind: u8, body: &[u8]) -> std::io::Result<()> {
    let len = i32::try_from(body.len() + 4).map_err(|_| invalid("message length"))?;
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.push(kind);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame).await
}

/// Reads the server's messages up to `ReadyForQuery` and says what they
/// answered.
async fn read_commit_reply(sr: &mut OwnedReadHalf) -> CommitReply {
    let mut reply = CommitReply::NoAnswer;
    loop {
        match read_message(sr).await {
            Ok(Some((b'C', body))) => {
                let (tag, _) = cstr(&body, 0);
                reply = if tag == "COMMIT" {
                    CommitReply::Committed
                } else {
                    CommitReply::Tag(tag)
                };
            }
            Ok(Some((b'E', body))) => reply = CommitReply::Error(error_message(&body)),
            Ok(Some((b'Z', _))) => return reply,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return reply,
        }
    }
}

/// The `M` (message) field of an `ErrorResponse`.
fn error_message(body: &[u8]) -> String {
    let mut at = 0;
    while let Some(&field) = body.get(at) {
        if field == 0 {
            break;
        }
        let (value, next) = cstr(body, at + 1);
        if field == b'M' {
            return value;
        }
        at = next;
    }
    String::from("(no message)")
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("PostgreSQL protocol: bad {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_transaction_control() {
        assert!(is_commit("COMMIT"));
        assert!(is_commit(" commit ; "));
        assert!(is_commit("END TRANSACTION"));
        assert!(!is_commit("COMMIT PREPARED 'x'"));
        assert!(!is_commit("SELECT 'COMMIT'"));
        assert!(ends_transaction("ROLLBACK"));
        assert!(starts_transaction("BEGIN ISOLATION LEVEL SERIALIZABLE"));
    }

    #[test]
    fn reads_nul_terminated_fields() {
        let body = b"s1\0SELECT 1\0\0\0";
        let (name, next) = cstr(body, 0);
        assert_eq!(name, "s1");
        assert_eq!(cstr(body, next).0, "SELECT 1");
        assert_eq!(
            error_message(b"SERROR\0C40001\0Mcould not serialize\0\0"),
            "could not serialize"
        );
    }
}
