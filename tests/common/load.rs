//! A client loop for the tests that change the fleet under load (reload, scale, a killed
//! worker): two threads that open a new connection per request (`Connection: close`) and two
//! that keep one connection alive, until stopped. Failures are counted honestly: the one
//! outcome retried, as HTTP clients do, is a clean close before any byte of the answer on a
//! reused keep-alive connection (the server closed it as idle; the request never reached the
//! application). Resets, timeouts, end of file in the middle of an answer, refused connects
//! and answers without the expected text are failures.

use super::http_get;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long one answer may take before it counts as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How reading one HTTP response ended.
pub enum Response {
    Complete(String),
    /// The server closed the connection (end of file) before the first byte of the answer:
    /// on a reused keep-alive connection, the one outcome an HTTP client retries.
    ClosedBeforeAnyByte,
    /// Anything else: an error or a timeout, or end of file in the middle of the answer.
    Failed(String),
}

/// Read one HTTP response (headers + Content-Length body).
pub fn read_response(r: &mut BufReader<TcpStream>) -> Response {
    let mut head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) if head.is_empty() => return Response::ClosedBeforeAnyByte,
            Ok(0) => return Response::Failed(format!("end of file after {head:?}")),
            Ok(_) => {}
            Err(e) => return Response::Failed(format!("{e} after {head:?}{line:?}")),
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    if let Err(e) = r.read_exact(&mut body) {
        return Response::Failed(format!("{e} in the body after {head:?}"));
    }
    Response::Complete(head + &String::from_utf8_lossy(&body))
}

/// What the client threads saw. Every request is counted once: answered, retried (see
/// [`Response::ClosedBeforeAnyByte`]), or failed.
#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    /// The first failures, for the assertion message.
    failures: Mutex<Vec<String>>,
}

impl Counts {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }
}

/// What a [`ClientLoop`] counted.
#[derive(Debug)]
pub struct LoadSummary {
    pub ok: u64,
    pub failed: u64,
    /// Requests sent again on a new connection after a reused keep-alive connection was
    /// closed cleanly before any byte of their answer.
    pub retried: u64,
    /// The first failures.
    pub failures: Vec<String>,
}

/// Client threads against `127.0.0.1:port` until [`ClientLoop::finish`] (or drop).
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    threads: Vec<JoinHandle<()>>,
}

impl ClientLoop {
    /// Start the threads: two with a new connection per request, two keep-alive. An answer
    /// is good when it contains `answer`.
    pub fn start(port: u16, answer: &'static str) -> ClientLoop {
        Self::with(port, answer, 2, 2)
    }

    /// Four threads with a new connection per request, none keep-alive: for a server whose
    /// own shutdown resets the requests that reach its idle keep-alive connections.
    pub fn new_connections_only(port: u16, answer: &'static str) -> ClientLoop {
        Self::with(port, answer, 4, 0)
    }

    fn with(port: u16, answer: &'static str, new: usize, keep: usize) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let mut threads = Vec::new();
        for _ in 0..new {
            let (stop, counts) = (stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(port) {
                        Ok(b) if b.contains(answer) => {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(b) => counts.fail(format!("new connection: bad answer {b:?}")),
                        Err(e) => counts.fail(format!("new connection: {e}")),
                    }
                }
            }));
        }
        for _ in 0..keep {
            let (stop, counts) = (stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || {
                keep_alive(port, answer, &stop, &counts)
            }));
        }
        ClientLoop {
            stop,
            counts,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.counts.ok.load(Ordering::Relaxed)
    }

    /// Stop the threads and say what they saw.
    pub fn finish(mut self) -> LoadSummary {
        self.join();
        LoadSummary {
            ok: self.counts.ok.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            retried: self.counts.retried.load(Ordering::Relaxed),
            failures: self.counts.failures.lock().unwrap().clone(),
        }
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.join();
    }
}

/// One keep-alive client: requests on one connection for as long as the server keeps it.
fn keep_alive(port: u16, answer: &str, stop: &AtomicBool, counts: &Counts) {
    let connect = || -> std::io::Result<BufReader<TcpStream>> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(BufReader::new(s))
    };
    // The connection, and whether it already carried an answer (reused).
    let mut conn: Option<(BufReader<TcpStream>, bool)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (mut c, reused) = match conn.take() {
            Some(c) => c,
            None => match connect() {
                Ok(c) => (c, false),
                Err(e) => {
                    counts.fail(format!("keep-alive connect: {e}"));
                    continue;
                }
            },
        };
        if let Err(e) = c.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") {
            counts.fail(format!("keep-alive write (reused: {reused}): {e}"));
            continue;
        }
        match read_response(&mut c) {
            Response::Complete(r) if r.contains(answer) => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                if !r.to_ascii_lowercase().contains("connection: close") {
                    conn = Some((c, true));
                }
            }
            Response::Complete(r) => counts.fail(format!("keep-alive: bad answer {r:?}")),
            // Closed as idle by a draining worker: the request is sent again on a new
            // connection (the next turn), as HTTP clients do.
            Response::ClosedBeforeAnyByte if reused => {
                counts.retried.fetch_add(1, Ordering::Relaxed);
            }
            Response::ClosedBeforeAnyByte => {
                counts.fail("keep-alive: a new connection closed without an answer".into())
            }
            Response::Failed(e) => counts.fail(format!("keep-alive (reused: {reused}): {e}")),
        }
    }
}
