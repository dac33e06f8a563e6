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
        Ok(Invocation::Status {
            target,
            json,
            check,
        }) => client(
            &target,
            control::Request::Status,
            Output::Status { json, check },
        ),
        Ok(Invocation::Reload { target, canary }) => client(
            &target,
            control::Request::Reload { canary },
            Output::Message,
        ),
        Ok(Invocation::Scale { target, workers }) => client(
            &target,
            control::Request::Scale { workers },
            Output::Message,
        ),
        Ok(Invocation::Metrics { target }) => {
            client(&target, control::Request::Metrics, Output::Metrics)
        }
        Ok(Invocation::Signal {
            target,
            signal,
            slot,
            generation,
        }) => client(
            &target,
            control::Request::Signal {
                signal,
                slot,
                generation,
            },
            Output::Message,
        ),
        Ok(Invocation::Send {
            target,
            slot,
            payload,
        }) => client(
            &target,
            control::Request::Send {
                slot,
                payload: Some(payload),
                payload_base64: None,
            },
            Output::Message,
        ),
        Ok(Invocation::Messages { target, json }) => match locate(&target, false) {
            Some(path) => follow_messages(&path, json),
            None => 1,
        },
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

/// What a client command prints.
#[derive(Clone, Copy)]
enum Output {
    /// `status`: the table, `--json`, or with `--check` one line and the exit code.
    Status {
        json: bool,
        check: bool,
    },
    Message,
    Metrics,
}

/// `status --check`'s exit codes, for exec probes.
mod check {
    pub const READY: i32 = 0;
    pub const NOT_READY: i32 = 1;
    pub const NO_FLEET: i32 = 2;
}

/// The control socket of the fleet `target` names (control::locate), or `None` once the
/// reason is printed. Unless `quiet`, says which fleet it found when nothing was named.
fn locate(target: &config::Target, quiet: bool) -> Option<std::path::PathBuf> {
    match control::locate::locate(
        &target.control,
        target.explicit,
        target.name.as_deref(),
        target.xdg_runtime_dir.as_deref(),
    ) {
        Ok((path, found)) => {
            if let Some(fleet) = found.filter(|_| !quiet) {
                eprintln!("sockvisor: the running fleet: {}", printable(&fleet));
            }
            Some(path)
        }
        Err(e) => {
            eprintln!("sockvisor: {}", printable(&e));
            None
        }
    }
}

/// Send one request to a running sockvisor and print the answer (with no control
/// character that could drive the terminal, but the metrics, printed as sent).
fn client(target: &config::Target, request: control::Request, output: Output) -> i32 {
    let checking = matches!(output, Output::Status { check: true, .. });
    let failed = if checking { check::NO_FLEET } else { 1 };
    let Some(path) = locate(target, checking) else {
        return failed;
    };
    // A probe must answer within its own timeout: a short one for --check.
    let timeout = Duration::from_secs(if checking { 10 } else { 600 });
    let reply = match control::request(&path, &request, timeout) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sockvisor: {e}");
            return failed;
        }
    };
    if !reply.ok {
        eprintln!(
            "sockvisor: {}",
            printable(reply.error.as_deref().unwrap_or("request failed"))
        );
        return failed;
    }
    match (output, &reply.status) {
        (Output::Metrics, _) => {
            print!("{}", reply.metrics.as_deref().unwrap_or_default());
        }
        (Output::Status { check: true, .. }, Some(status)) => {
            return match &status.not_ready {
                None if status.ready => {
                    println!("ready");
                    check::READY
                }
                why => {
                    println!(
                        "not ready: {}",
                        printable(why.as_deref().unwrap_or("unknown reason"))
                    );
                    check::NOT_READY
                }
            };
        }
        (Output::Status { json: true, .. }, Some(status)) => println!(
            "{}",
            serde_json::to_string_pretty(status).unwrap_or_default()
        ),
        (Output::Status { .. }, Some(status)) => {
            print!("{}", control::format_status_table(status))
        }
        _ => {
            if let Some(m) = &reply.message {
                println!("{}", printable(m));
            }
        }
    }
    0
}
