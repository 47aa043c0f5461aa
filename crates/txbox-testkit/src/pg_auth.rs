//! A PostgreSQL stand-in that asks for a password and refuses it, as a
//! server with password authentication does for a wrong one (SQLSTATE
//! 28P01). The shared test server trusts every connection, so this is how
//! a test sees the client side of a wrong password: the password is really
//! sent (the stand-in records it), and the error comes back.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Startup-phase request codes that ask for encryption before startup.
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
/// Larger startup or password messages are not read.
const MAX_MESSAGE: usize = 1 << 16;

/// A listener refusing every password it is sent; stops when dropped.
#[derive(Debug)]
pub struct RefusingPg {
    port: u16,
    passwords: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl RefusingPg {
    /// Listens on a free local port.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let passwords = Arc::new(Mutex::new(Vec::new()));
        let seen = passwords.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = refuse(stream, &seen).await;
                });
            }
        });
        RefusingPg {
            port,
            passwords,
            task,
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The passwords clients sent so far.
    pub fn passwords(&self) -> Vec<String> {
        self.passwords
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for RefusingPg {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_body(stream: &mut TcpStream, len: i32) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(len)
        .ok()
        .and_then(|n| n.checked_sub(4))
        .filter(|n| *n <= MAX_MESSAGE)
        .ok_or_else(|| std::io::Error::other("bad message length"))?;
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// Reads the startup (answering "no" to encryption requests), asks for a
/// cleartext password, reads it, records it in `seen` and answers 28P01.
async fn refuse(mut stream: TcpStream, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    loop {
        let len = stream.read_i32().await?;
        let body = read_body(&mut stream, len).await?;
        let code = body
            .get(..4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if code == Some(SSL_REQUEST) || code == Some(GSSENC_REQUEST) {
            stream.write_all(b"N").await?;
            continue;
        }
        break;
    }
    // AuthenticationCleartextPassword.
    stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await?;
    if stream.read_u8().await? != b'p' {
        return Ok(());
    }
    let len = stream.read_i32().await?;
    let body = read_body(&mut stream, len).await?;
    let password = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
    // Recorded before the answer, so a client that has its error sees it.
    seen.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(password);
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "28P01"),
        (b'M', "password authentication failed for user \"postgres\""),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut reply = vec![b'E'];
    reply.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
    reply.extend_from_slice(&fields);
    stream.write_all(&reply).await?;
    stream.flush().await?;
    Ok(())
}
