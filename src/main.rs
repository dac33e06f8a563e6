//! `sockvisor`: run a fleet, or talk to a running one.

use sockvisor::config::{self, Invocation, Sources};
use sockvisor::control::table::printable;
use sockvisor::{activation, control, exit, logging, supervisor, upstream};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    // fds 0-2: Rust's runtime opens /dev/null on any of them that is closed before main
    // runs, so no socket of sockvisor's can land there (tests/hardening.rs checks it).
    // Before anything else, and before any thread could exist: block the signals the
    // supervisor reads from its signalfd, take systemd's fds and unset LISTEN_* and
    // WATCHDOG_* (invariants 1 and 2).
    if let Err(e) = supervisor::handled_signals().thread_block() {
        eprintln!("sockvisor: error cannot block signals: {e}");
        return ExitCode::from(exit::INTERNAL as u8);
    }
    logging::init();
    let passed = activation::take_from_env();
    let upstream = upstream::Upstream::from_env();
    let sources = Sources::from_process();
    let code = match config::load(&sources) {
        Err(e) => {
            logging::fatal(&e);
            exit::CONFIG
        }
        Ok(Invocation::Help(text)) => {
            print!("{text}");
            exit::OK
        }
        Ok(Invocation::Version) => {
            println!("sockvisor {}", env!("CARGO_PKG_VERSION"));
            exit::OK
        }
        Ok(Invocation::Run(config)) => supervisor::run(*config, sources, passed, upstream),
        Ok(Invocation::Status { control, json }) => {
            client(&control, control::Request::Status, json)
        }
        Ok(Invocation::Reload { control, canary }) => {
            client(&control, control::Request::Reload { canary }, false)
        }
        Ok(Invocation::Scale { control, workers }) => {
            client(&control, control::Request::Scale { workers }, false)
        }
        Ok(Invocation::Signal {
            control,
            signal,
            slot,
            generation,
        }) => client(
            &control,
            control::Request::Signal {
                signal,
                slot,
                generation,
            },
            false,
        ),
        Ok(Invocation::Send {
            control,
            slot,
            payload,
        }) => client(
            &control,
            control::Request::Send {
                slot,
                payload: Some(payload),
                payload_base64: None,
            },
            false,
        ),
        Ok(Invocation::Messages { control, json }) => follow_messages(&control, json),
    };
    ExitCode::from(code as u8)
}

/// `sockvisor messages --follow`: print each message a worker sends to the operator, one
/// line each (`--json`: the event as sockvisor sent it), until sockvisor goes away.
fn follow_messages(path: &std::path::Path, json: bool) -> i32 {
    use std::io::Write;
    let request = control::Request::Messages { follow: true };
    let mut out = std::io::stdout();
    let mut reader_gone = false;
    // A write error (the reader went away: `| head -1`) ends the command.
    let printed = control::follow(path, &request, Duration::from_secs(30), |event| {
        let written = if json {
            let line = serde_json::to_string(&event).unwrap_or_default();
            writeln!(out, "{line}").is_ok()
        } else {
            print_event(&mut out, event)
        };
        reader_gone = !written;
        written
    });
    match printed {
        Ok(reply) if reply.ok => {
            if !reader_gone {
                eprintln!("sockvisor: the fleet closed the connection (it stopped)");
            }
            0
        }
        Ok(reply) => {
            eprintln!(
                "sockvisor: {}",
                printable(reply.error.as_deref().unwrap_or("request failed"))
            );
            1
        }
        Err(e) => {
            eprintln!("sockvisor: {e}");
            1
        }
    }
}

/// One event of `messages --follow` as a line; false when stdout is gone.
fn print_event(out: &mut impl std::io::Write, event: control::Event) -> bool {
    match event {
        control::Event::Message {
            from,
            payload,
            payload_base64,
        } => {
            let text = match (payload, payload_base64) {
                (Some(text), _) => printable(&text),
                (None, Some(b64)) => format!("base64:{b64}"),
                (None, None) => String::new(),
            };
            writeln!(
                out,
                "slot {} (pid {}, generation {}): {text}",
                from.slot, from.pid, from.generation
            )
            .is_ok()
        }
        control::Event::Dropped { count } => {
            eprintln!(
                "sockvisor: {count} messages were not shown: this command did not read them fast enough"
            );
            true
        }
    }
}

/// Send one request to a running sockvisor and print the answer (with no control
/// character that could drive the terminal).
fn client(path: &std::path::Path, request: control::Request, json: bool) -> i32 {
    let timeout = Duration::from_secs(600);
    let reply = match control::request(path, &request, timeout) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sockvisor: {e}");
            return 1;
        }
    };
    if !reply.ok {
        eprintln!(
            "sockvisor: {}",
            printable(reply.error.as_deref().unwrap_or("request failed"))
        );
        return 1;
    }
    match (&reply.status, json) {
        (Some(status), true) => println!(
            "{}",
            serde_json::to_string_pretty(status).unwrap_or_default()
        ),
        (Some(status), false) => print!("{}", control::format_status_table(status)),
        (None, _) => {
            if let Some(m) = &reply.message {
                println!("{}", printable(m));
            }
        }
    }
    0
}
