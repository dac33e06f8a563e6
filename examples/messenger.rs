//! messenger: a worker that talks (tests/messages.rs; a demo of `sockvisor::worker::Messages`).
//!
//! Serves `HTTP/1.1 200` with `Connection: close` on every stream listener (one thread
//! each), records what it gets, and obeys commands the operator sends it
//! (`sockvisor send --slot N 'COMMAND'`):
//!
//! - `broadcast TEXT`: TEXT to every other worker; `to SLOT TEXT`: TEXT to one slot;
//!   `operator TEXT`: TEXT to the operator (`sockvisor messages --follow`);
//! - `flood-broadcast N` / `flood-operator N`: N messages (`flood I`), as fast as it can.
//!
//! Records, one line each, in `$MESSENGER_DIR/<slot>-<pid>.log`: `started` (its signal
//! mask is set), `signal SIGUSR1` (any of SIGUSR1, SIGUSR2, SIGHUP, SIGWINCH), and
//! `message from=F to=T PAYLOAD` for every message but floods (F, T: a slot, `operator`,
//! `all`), which it counts. `MESSENGER_DEAF_SLOT=N`: the worker of slot N never reads its
//! messages. Sends `READY=1` once it is set up. SIGTERM: exit 0.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use sockvisor::worker::{self, Address, Listeners, Messages};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

fn address(a: Address) -> String {
    match a {
        Address::Slot(s) => s.to_string(),
        Address::All => "all".into(),
        Address::Operator => "operator".into(),
    }
}

/// Appends lines to this worker's record (or nowhere without MESSENGER_DIR).
#[derive(Clone)]
struct Record(Option<Arc<Mutex<std::fs::File>>>);

impl Record {
    fn open(slot: &str) -> Record {
        Record(std::env::var_os("MESSENGER_DIR").map(|dir| {
            let path =
                std::path::Path::new(&dir).join(format!("{slot}-{}.log", std::process::id()));
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("record");
            Arc::new(Mutex::new(f))
        }))
    }

    fn line(&self, line: &str) {
        if let Some(f) = &self.0 {
            let _ = writeln!(f.lock().unwrap(), "{line}");
        }
    }
}

fn obey(messages: &Messages, command: &str) -> std::io::Result<()> {
    let (verb, rest) = command.split_once(' ').unwrap_or((command, ""));
    match verb {
        "broadcast" => messages.broadcast(rest.as_bytes()),
        "operator" => messages.to_operator(rest.as_bytes()),
        "to" => {
            let (slot, text) = rest.split_once(' ').unwrap_or((rest, ""));
            match slot.parse() {
                Ok(slot) => messages.send_to(slot, text.as_bytes()),
                Err(_) => Ok(()),
            }
        }
        "flood-broadcast" | "flood-operator" => {
            for i in 0..rest.parse::<u64>().unwrap_or(0) {
                let payload = format!("flood {i}");
                if verb == "flood-broadcast" {
                    messages.broadcast(payload.as_bytes())?;
                } else {
                    messages.to_operator(payload.as_bytes())?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn listen_for_messages(messages: Messages, record: Record) {
    let mut floods = 0u64;
    loop {
        let m = match messages.recv() {
            Ok(m) => m,
            Err(_) => std::process::exit(0), // sockvisor is gone
        };
        if m.payload.starts_with(b"flood ") {
            floods += 1;
            if floods % 1000 == 0 {
                record.line(&format!("floods {floods}"));
            }
            continue;
        }
        let text = String::from_utf8_lossy(&m.payload);
        record.line(&format!(
            "message from={} to={} {text}",
            address(m.from),
            address(m.to)
        ));
        if m.from == Address::Operator {
            if let Err(e) = obey(&messages, &text) {
                record.line(&format!("error {e}"));
            }
        }
    }
}

fn serve(web: worker::Incoming) {
    let body = format!(
        "messenger {} (pid {})\n",
        worker::worker_id().map_or("-".into(), |i| i.to_string()),
        std::process::id()
    );
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    loop {
        let mut conn = match web.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => std::process::exit(0),
            Err(_) => continue,
        };
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(reply.as_bytes());
        // Our side first (FIN), then read what is left: the client sees a clean close.
        if let Some(tcp) = conn.as_tcp() {
            let _ = tcp.shutdown(std::net::Shutdown::Write);
        }
        let _ = conn.read(&mut buf);
    }
}

fn main() {
    let slot = worker::worker_id().map_or("-".to_string(), |i| i.to_string());
    // Signals arrive on a signalfd; blocked before any thread exists, so in all of them.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGHUP,
        Signal::SIGWINCH,
        Signal::SIGTERM,
    ] {
        mask.add(s);
    }
    mask.thread_block().expect("block signals");
    let signals = SignalFd::new(&mask).expect("signalfd");
    let record = Record::open(&slot);
    let mut listeners = Listeners::from_env().expect("LISTEN_FDS");
    let names: Vec<String> = listeners.names().map(str::to_string).collect();
    for name in names {
        if let Some(web) = listeners.take_stream(&name) {
            std::thread::spawn(move || serve(web));
        }
    }
    let messages = Messages::from_env().expect("SOCKVISOR_MESSAGES_FD");
    let deaf = std::env::var("MESSENGER_DEAF_SLOT").ok() == Some(slot.clone());
    // A deaf worker keeps its socket open and never reads it.
    let _kept = match messages {
        Some(m) if !deaf => {
            let r = record.clone();
            std::thread::spawn(move || listen_for_messages(m, r));
            None
        }
        other => other,
    };
    record.line("started");
    let _ = worker::notify_ready();
    loop {
        match signals.read_signal() {
            Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTERM) => std::process::exit(0),
                Ok(s) => record.line(&format!("signal {}", s.as_str())),
                Err(_) => {}
            },
            Ok(None) => {}
            Err(_) => std::process::exit(1),
        }
    }
}
