//! A small HTTP server for the supervisor's event loop: `GET /metrics`, `/livez`, `/readyz`.
//!
//! One request per connection (HTTP/1.0 style: every answer says `Connection: close`), served
//! without blocking and without a thread. The supervisor registers the listener
//! ([`Token::HttpListener`]) and every connection ([`Token::HttpClient`]); on an event it
//! calls [`HttpServer::accept`] or [`HttpServer::ready`], and answers a complete request at
//! once with [`HttpServer::respond`]. What a slow or hostile client costs is bounded:
//! - at most [`MAX_CONNECTIONS`] connections; past that the oldest one still sending its
//!   request is closed for the newcomer (a flood of idle connections cannot lock a scraper
//!   out), or the newcomer is closed when every connection is being answered;
//! - a request head of at most [`MAX_HEAD`] bytes (a longer one: `431`, then close), read
//!   [`READ_CHUNK`] bytes per wake-up at most;
//! - every connection is closed [`CONNECTION_TIMEOUT`] after it was accepted, answered or
//!   not ([`HttpServer::expire`], at [`HttpServer::next_deadline`] on the loop's timer);
//! - an answer is written as far as the socket takes it; the rest waits for `EPOLLOUT`.

use crate::poller::{Poller, Token};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8 * 1024;
/// Bytes read from one connection per wake-up.
pub const READ_CHUNK: usize = 4 * 1024;
/// A connection's whole life: request, answer and all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted per wake-up.
const ACCEPTS_PER_WAKE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

/// A complete request, to be answered with [`HttpServer::respond`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u32,
    pub method: Method,
    /// Without the query string.
    pub path: String,
    /// The client accepts OpenMetrics (`Accept: application/openmetrics-text`).
    pub openmetrics: bool,
}

/// Why connections were closed without an answer, and how many were answered: the
/// `sockvisor_http_*` series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpFigures {
    pub answered: u64,
    /// Closed to make room (or refused) at [`MAX_CONNECTIONS`].
    pub over_limit: u64,
    /// Closed at [`CONNECTION_TIMEOUT`].
    pub timed_out: u64,
    /// Answered with 4xx for a request that was not one (too long, malformed, wrong method).
    pub bad_requests: u64,
}

enum Phase {
    /// Reading the request head.
    Reading,
    /// Writing the answer; closed once it is out.
    Writing,
}

struct Connection {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    phase: Phase,
    deadline: Instant,
}

pub struct HttpServer {
    listener: TcpListener,
    connections: BTreeMap<u32, Connection>,
    next_id: u32,
    figures: HttpFigures,
}

/// What a request head says, or the error status to answer.
fn parse_head(head: &[u8]) -> Result<(Method, String, bool), (u16, &'static str)> {
    let text = std::str::from_utf8(head).map_err(|_| (400, "bad request\n"))?;
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err((400, "bad request\n"));
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err((400, "bad request\n"));
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => return Err((405, "only GET and HEAD\n")),
    };
    let path = target.split('?').next().unwrap_or(target).to_string();
    let openmetrics = lines
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
        .any(|(_, value)| value.contains("application/openmetrics-text"));
    Ok((method, path, openmetrics))
}

/// Where a request head ends (after its blank line), if it does.
fn head_end(input: &[u8]) -> Option<usize> {
    (0..input.len()).find_map(|i| {
        if input[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if input[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

impl HttpServer {
    /// Bind `addr` (non-blocking, close-on-exec).
    pub fn bind(addr: SocketAddr) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(HttpServer {
            listener,
            connections: BTreeMap::new(),
            next_id: 0,
            figures: HttpFigures::default(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn register(&self, poller: &Poller) -> nix::Result<()> {
        poller.register(&self.listener, Token::HttpListener)
    }

    pub fn figures(&self) -> HttpFigures {
        self.figures
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.connections.len()
    }

    /// The listener is readable: take what waits, within the limits.
    pub fn accept(&mut self, poller: &Poller, now: Instant) {
        for _ in 0..ACCEPTS_PER_WAKE {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog; the listener
                    // stays readable and is tried again on the next wake-up.
                    log::debug!("metrics listener: accept failed: {e}");
                    return;
                }
            };
            if self.connections.len() >= MAX_CONNECTIONS && !self.evict_oldest_reader(poller) {
                self.figures.over_limit += 1;
                continue; // dropped: closed
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let id = self.next_free_id();
            if let Err(e) = poller.register(&stream, Token::HttpClient(id)) {
                log::debug!("metrics listener: cannot poll a connection: {e}");
                continue;
            }
            self.connections.insert(
                id,
                Connection {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    written: 0,
                    phase: Phase::Reading,
                    deadline: now + CONNECTION_TIMEOUT,
                },
            );
        }
    }

    fn next_free_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if !self.connections.contains_key(&id) {
                return id;
            }
        }
    }

    /// Close the connection that has been sending its request the longest. False when every
    /// connection is being answered.
    fn evict_oldest_reader(&mut self, poller: &Poller) -> bool {
        let oldest = self
            .connections
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Reading))
            .min_by_key(|(_, c)| c.deadline)
            .map(|(&id, _)| id);
        match oldest {
            Some(id) => {
                self.close(id, poller);
                self.figures.over_limit += 1;
                true
            }
            None => false,
        }
    }

    fn close(&mut self, id: u32, poller: &Poller) {
        if let Some(c) = self.connections.remove(&id) {
            poller.unregister(&c.stream);
        }
    }

    /// A connection is readable or writable. Returns its request once the head is complete.
    pub fn ready(&mut self, id: u32, poller: &Poller) -> Option<Request> {
        let c = self.connections.get_mut(&id)?;
        match c.phase {
            Phase::Writing => {
                self.write(id, poller);
                None
            }
            Phase::Reading => self.read(id, poller),
        }
    }

    fn read(&mut self, id: u32, poller: &Poller) -> Option<Request> {
        let c = self.connections.get_mut(&id)?;
        let mut buf = [0u8; READ_CHUNK];
        let room = (MAX_HEAD + 1).saturating_sub(c.input.len()).min(READ_CHUNK);
        match c.stream.read(&mut buf[..room.max(1)]) {
            Ok(0) => {
                self.close(id, poller);
                return None;
            }
            Ok(n) => c.input.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return None
            }
            Err(_) => {
                self.close(id, poller);
                return None;
            }
        }
        let Some(end) = head_end(&c.input) else {
            if c.input.len() > MAX_HEAD {
                self.figures.bad_requests += 1;
                self.send(
                    id,
                    poller,
                    431,
                    "text/plain",
                    b"request head too long\n",
                    false,
                );
            }
            return None;
        };
        match parse_head(&c.input[..end]) {
            Ok((method, path, openmetrics)) => Some(Request {
                id,
                method,
                path,
                openmetrics,
            }),
            Err((status, body)) => {
                self.figures.bad_requests += 1;
                self.send(id, poller, status, "text/plain", body.as_bytes(), false);
                None
            }
        }
    }

    /// Answer request `id`: `status` with `body` (not sent for `HEAD`), then close.
    pub fn respond(
        &mut self,
        request: &Request,
        poller: &Poller,
        status: u16,
        content_type: &str,
        body: &[u8],
    ) {
        self.figures.answered += 1;
        let head_only = request.method == Method::Head;
        self.send(request.id, poller, status, content_type, body, head_only);
    }

    fn send(
        &mut self,
        id: u32,
        poller: &Poller,
        status: u16,
        content_type: &str,
        body: &[u8],
        head_only: bool,
    ) {
        let Some(c) = self.connections.get_mut(&id) else {
            return;
        };
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            reason(status),
            body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(body);
        }
        c.output = out;
        c.written = 0;
        c.input = Vec::new();
        c.phase = Phase::Writing;
        self.write(id, poller);
    }

    /// Write what the socket takes; close once all is out, or poll for `EPOLLOUT`.
    fn write(&mut self, id: u32, poller: &Poller) {
        let Some(c) = self.connections.get_mut(&id) else {
            return;
        };
        while c.written < c.output.len() {
            match c.stream.write(&c.output[c.written..]) {
                Ok(0) => break,
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if poller
                        .watch(&c.stream, Token::HttpClient(id), true)
                        .is_err()
                    {
                        self.close(id, poller);
                    }
                    return;
                }
                Err(_) => break,
            }
        }
        // All out (or the peer is gone). Half-close first, so that a client still sending
        // (a request longer than we read) sees our answer before a reset.
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        self.close(id, poller);
    }

    /// Close the connections past their deadline.
    pub fn expire(&mut self, now: Instant, poller: &Poller) {
        let overdue: Vec<u32> = self
            .connections
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(&id, _)| id)
            .collect();
        for id in overdue {
            self.figures.timed_out += 1;
            self.close(id, poller);
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.connections.values().map(|c| c.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok((Method::Get, "/metrics".to_string(), false))
        );
        assert_eq!(
            parse_head(b"HEAD /readyz?verbose HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"),
            Ok((Method::Head, "/readyz".to_string(), true))
        );
        assert_eq!(parse_head(b"POST / HTTP/1.1\r\n\r\n").unwrap_err().0, 405);
        assert_eq!(parse_head(b"GET\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(parse_head(b"GET x HTTP/1.1\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(parse_head(b"GET / SPDY\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(parse_head(b"\xff\xfe\r\n\r\n").unwrap_err().0, 400);
    }

    /// The server against real loopback sockets, driven by hand (no event loop): an answer,
    /// a refused method, the connection limit, the timeout.
    #[test]
    fn limits_against_real_sockets() {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        let poller = Poller::new().unwrap();
        let mut server = HttpServer::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        server.register(&poller).unwrap();
        let addr = server.local_addr().unwrap();
        let now = Instant::now();
        // Accept until `n` connections are open (a connect returns before the accept).
        let accept_all = |server: &mut HttpServer, n: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while server.open() < n && Instant::now() < deadline {
                server.accept(&poller, now);
            }
        };
        // Read and answer what connection `id` sent.
        let serve = |server: &mut HttpServer, id: u32| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(r) = server.ready(id, &poller) {
                    server.respond(&r, &poller, 200, "text/plain", b"hi\n");
                    return;
                }
                if !server.connections.contains_key(&id) || Instant::now() > deadline {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let read_all = |mut c: TcpStream| {
            let mut out = String::new();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = c.read_to_string(&mut out);
            out
        };

        let mut good = TcpStream::connect(addr).unwrap();
        let mut post = TcpStream::connect(addr).unwrap();
        let idle = TcpStream::connect(addr).unwrap();
        accept_all(&mut server, 3);
        assert_eq!(server.open(), 3);
        good.write_all(b"GET /x HTTP/1.0\r\n\r\n").unwrap();
        post.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let ids: Vec<u32> = server.connections.keys().copied().collect();
        for &id in &ids[..2] {
            serve(&mut server, id);
        }
        let answer = read_all(good);
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\nhi\n"),
            "{answer:?}"
        );
        assert!(read_all(post).starts_with("HTTP/1.1 405 "));
        assert_eq!(server.open(), 1);
        let f = server.figures();
        assert_eq!((f.answered, f.bad_requests), (1, 1));

        // The limit: the oldest connection still reading (`idle`) makes room.
        let mut more = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            more.push(TcpStream::connect(addr).unwrap());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.figures().over_limit < 1 && Instant::now() < deadline {
            server.accept(&poller, now);
        }
        assert_eq!(server.open(), MAX_CONNECTIONS);
        assert_eq!(server.figures().over_limit, 1);
        assert_eq!(read_all(idle), "", "the evicted connection is closed");

        // The timeout closes them all.
        assert_eq!(server.next_deadline(), Some(now + CONNECTION_TIMEOUT));
        server.expire(now + CONNECTION_TIMEOUT, &poller);
        assert_eq!(server.open(), 0);
        assert_eq!(server.figures().timed_out, MAX_CONNECTIONS as u64);
    }

    #[test]
    fn head_ends() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n"), None);
    }
}
