//! The control socket's client side: `sockvisor status | reload | scale N | signal | send`,
//! and `sockvisor messages --follow` ([`follow`]).
//!
//! Before it sends anything, the client checks who answers: the server's `SO_PEERCRED` uid
//! must be root or the caller's own (effective) uid. Anyone else may have created the
//! socket (say, by taking the default directory before sockvisor did), and would be told
//! what to do and trusted with what it answers.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt};

use super::protocol::{Event, Reply, Request};

/// Largest reply the client accepts.
const MAX_REPLY: usize = 64 << 20;

/// Why a control request failed (the reply itself may also be `ok: false`).
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens at the path.
    NotRunning {
        path: PathBuf,
    },
    /// The socket (or its directory) is not ours to use.
    PermissionDenied {
        path: PathBuf,
    },
    /// The process answering is neither root nor the caller's user.
    UntrustedServer {
        path: PathBuf,
        server_uid: u32,
        server_pid: i32,
        my_uid: u32,
    },
    /// No reply within the timeout.
    Timeout {
        path: PathBuf,
        after: Duration,
    },
    /// The reply was not a reply.
    Protocol {
        path: PathBuf,
        detail: String,
    },
    Io {
        path: PathBuf,
        error: io::Error,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::NotRunning { path } => write!(
                f,
                "no sockvisor is running at {} (is the service started? use --control PATH)",
                path.display()
            ),
            ClientError::PermissionDenied { path } => write!(
                f,
                "permission denied on {} (run as root or as the user sockvisor runs as)",
                path.display()
            ),
            ClientError::UntrustedServer {
                path,
                server_uid,
                server_pid,
                my_uid,
            } => write!(
                f,
                "refusing to talk to {}: it is served by pid {server_pid} running as uid {server_uid}, \
                 and only a sockvisor running as root or as you (uid {my_uid}) is trusted; \
                 if that is the fleet you meant, run this command as uid {server_uid}, \
                 else remove the socket and check who can write to its directory",
                path.display()
            ),
            ClientError::Timeout { path, after } => write!(
                f,
                "no reply from sockvisor at {} within {:.1}s",
                path.display(),
                after.as_secs_f64()
            ),
            ClientError::Protocol { path, detail } => {
                write!(f, "unexpected reply from {}: {detail}", path.display())
            }
            ClientError::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for ClientError {}

/// Send one request and wait (at most `timeout`, in total) for its reply. Blocking: for the
/// `sockvisor status|reload|scale` commands. `reload` replies when the reload is over, so
/// give it at least the reload timeout.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let deadline = Instant::now() + timeout;
    let (stream, write_error) = send_request(path, req, timeout, deadline)?;
    read_reply(path, stream, write_error, timeout, deadline).map(|(reply, _)| reply)
}

/// `sockvisor messages --follow`: send `req` (a `messages` request with `follow`), wait (at
/// most `timeout`) for its reply, then call `on_event` for every line that follows, with no
/// timeout, until sockvisor closes the connection (`Ok(reply)`) or `on_event` returns
/// false. A refused request returns its reply (`ok: false`) at once.
pub fn follow(
    path: &Path,
    req: &Request,
    timeout: Duration,
    mut on_event: impl FnMut(Event) -> bool,
) -> Result<Reply, ClientError> {
    use std::io::BufRead;
    let deadline = Instant::now() + timeout;
    let (stream, write_error) = send_request(path, req, timeout, deadline)?;
    let (reply, rest) = read_reply(path, stream, write_error, timeout, deadline)?;
    if !reply.ok {
        return Ok(reply);
    }
    let Some((stream, buffered)) = rest else {
        return Ok(reply);
    };
    stream
        .set_read_timeout(None)
        .map_err(|error| ClientError::Io {
            path: path.to_path_buf(),
            error,
        })?;
    let lines = io::BufReader::new(io::Cursor::new(buffered).chain(stream)).split(b'\n');
    for line in lines {
        let line = line.map_err(|error| ClientError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        if line.len() > MAX_REPLY {
            return Err(protocol_error(
                path,
                format!("line longer than {MAX_REPLY} bytes"),
            ));
        }
        let event: Event = serde_json::from_slice(&line).map_err(|e| {
            protocol_error(
                path,
                format!(
                    "{e}: {}",
                    String::from_utf8_lossy(&line[..line.len().min(200)])
                ),
            )
        })?;
        if !on_event(event) {
            break;
        }
    }
    Ok(reply)
}

fn protocol_error(path: &Path, detail: String) -> ClientError {
    ClientError::Protocol {
        path: path.to_path_buf(),
        detail,
    }
}

fn io_error(path: &Path, timeout: Duration, error: io::Error) -> ClientError {
    let p = || path.to_path_buf();
    match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { path: p() }
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: p() },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            path: p(),
            after: timeout,
        },
        _ => ClientError::Io { path: p(), error },
    }
}

/// Connect, check who serves the socket, write the request line. Returns the stream and
/// the write error, if the server closed before taking the line (it may have replied).
fn send_request(
    path: &Path,
    req: &Request,
    timeout: Duration,
    deadline: Instant,
) -> Result<(UnixStream, Option<io::Error>), ClientError> {
    let p = || path.to_path_buf();
    let io_err = |error: io::Error| io_error(path, timeout, error);
    let remaining = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(ClientError::Timeout {
            path: p(),
            after: timeout,
        })?;
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    // The kernel recorded the server's credentials when it called listen(): nothing it
    // sends can change them.
    let server =
        socket::getsockopt(&stream, sockopt::PeerCredentials).map_err(|e| io_err(e.into()))?;
    let my_uid = nix::unistd::geteuid().as_raw();
    if server.uid() != 0 && server.uid() != my_uid {
        return Err(ClientError::UntrustedServer {
            path: p(),
            server_uid: server.uid(),
            server_pid: server.pid(),
            my_uid,
        });
    }
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
        path: p(),
        detail: e.to_string(),
    })?;
    line.push(b'\n');
    stream.set_write_timeout(Some(remaining)).map_err(io_err)?;
    // A server that refuses us (peer credentials) writes its error and closes, maybe before
    // our write: read its reply anyway.
    let write_error = match stream.write_all(&line) {
        Ok(()) => None,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            Some(e)
        }
        Err(e) => return Err(io_err(e)),
    };
    Ok((stream, write_error))
}

/// Read the reply line (until `deadline`). Returns it, and the stream with the bytes read
/// after the line unless sockvisor closed the connection.
#[allow(clippy::type_complexity)]
fn read_reply(
    path: &Path,
    mut stream: UnixStream,
    write_error: Option<io::Error>,
    timeout: Duration,
    deadline: Instant,
) -> Result<(Reply, Option<(UnixStream, Vec<u8>)>), ClientError> {
    let p = || path.to_path_buf();
    let io_err = |error: io::Error| io_error(path, timeout, error);
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ClientError::Timeout {
                path: p(),
                after: timeout,
            })
    };
    let mut reply = Vec::new();
    let mut after = None;
    let mut buf = [0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(io_err)?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(write_error.unwrap_or(e))),
        };
        if n == 0 {
            if let (true, Some(e)) = (reply.is_empty(), write_error) {
                return Err(io_err(e));
            }
            if reply.is_empty() {
                return Err(ClientError::Protocol {
                    path: p(),
                    detail: "sockvisor closed the connection without replying".into(),
                });
            }
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            reply.extend_from_slice(&buf[..i]);
            after = Some(buf[i + 1..n].to_vec());
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.len() > MAX_REPLY {
            return Err(ClientError::Protocol {
                path: p(),
                detail: format!("reply longer than {MAX_REPLY} bytes"),
            });
        }
    }
    let reply = serde_json::from_slice(&reply).map_err(|e| ClientError::Protocol {
        path: p(),
        detail: format!(
            "{e}: {}",
            String::from_utf8_lossy(&reply[..reply.len().min(200)])
        ),
    })?;
    Ok((reply, after.map(|rest| (stream, rest))))
}
