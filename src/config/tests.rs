//! The whole configuration path through [`load`]: layers, flags, files, errors.

use super::cli::parse_cli;
use super::layers::file_layer;
use super::resolve::resolve;
use super::*;
use std::io::Write;

fn args(a: &[&str]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

fn env(e: &[(&str, &str)]) -> Vec<(String, String)> {
    e.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn run(a: &[&str], e: &[(&str, &str)]) -> Result<Config, ConfigError> {
    match load(&Sources {
        args: args(a),
        env: env(e),
    })? {
        Invocation::Run(c) => Ok(*c),
        other => panic!("expected Run, got {other:?}"),
    }
}

fn err(a: &[&str], e: &[(&str, &str)]) -> String {
    load(&Sources {
        args: args(a),
        env: env(e),
    })
    .expect_err("expected an error")
    .to_string()
}

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn defaults() {
    let c = run(&["--", "/bin/app"], &[]).unwrap();
    assert_eq!(c.command, vec!["/bin/app"]);
    assert!(c.workers >= 1);
    assert_eq!(c.ready, ReadyMode::Exec);
    assert_eq!(c.ready_timeout, Duration::from_secs(30));
    assert_eq!(c.stop_timeout, Duration::from_secs(10));
    assert_eq!(
        c.backoff,
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(10),
            give_up_after: 5
        }
    );
    assert_eq!(c.window, 64);
    assert_eq!(c.min_healthy, 1);
    assert_eq!(c.min_ready, None);
    assert_eq!(c.worker_watchdog, None);
    assert_eq!(c.reload_surge, 1);
    assert_eq!(c.reload_timeout, Duration::from_secs(60));
    assert_eq!(c.dispatch, DispatchPolicy::Auto);
    assert!(c.listeners.is_empty());
    assert!(c.control_socket.is_some());
}

#[test]
fn layering_cli_over_env_over_file() {
    let f = toml_file(
        "workers = 2\nwindow = 10\nready = \"notify\"\ncommand = \"/bin/file-app --x\"\n",
    );
    let p = f.path().to_str().unwrap();
    let c = run(&["-c", p], &[]).unwrap();
    assert_eq!((c.workers, c.window, c.ready), (2, 10, ReadyMode::Notify));
    assert_eq!(c.command, vec!["/bin/file-app", "--x"]);
    assert_eq!(c.file.as_deref(), Some(f.path()));

    let e = [("SOCKVISOR_WORKERS", "3"), ("SOCKVISOR_WINDOW", "20")];
    let c = run(&["-c", p], &e).unwrap();
    assert_eq!((c.workers, c.window), (3, 20));

    let c = run(&["-c", p, "-w4", "--", "/bin/cli"], &e).unwrap();
    assert_eq!((c.workers, c.window), (4, 20));
    assert_eq!(c.command, vec!["/bin/cli"]);

    // SOCKVISOR_CONFIG when -c is absent.
    let c = run(
        &[],
        &[
            ("SOCKVISOR_CONFIG", p),
            ("SOCKVISOR_COMMAND", "/bin/env-app a b"),
        ],
    )
    .unwrap();
    assert_eq!(c.workers, 2);
    assert_eq!(c.command, vec!["/bin/env-app", "a", "b"]);
}

#[test]
fn flag_forms() {
    for a in [
        &["-w", "4", "app"][..],
        &["-w4", "app"],
        &["--workers", "4", "app"],
        &["--workers=4", "app"],
    ] {
        assert_eq!(run(a, &[]).unwrap().workers, 4, "{a:?}");
    }
    let c = run(
        &[
            "--listen=web=tcp://127.0.0.1:80",
            "-l",
            "udp://[::1]:53",
            "--ready-timeout",
            "1.5s",
            "app",
            "--workers",
            "9",
        ],
        &[],
    )
    .unwrap();
    // Options stop at the first non-option word.
    assert_eq!(c.command, vec!["app", "--workers", "9"]);
    assert_eq!(c.listeners.len(), 2);
    assert_eq!(c.listeners[0].name, "web");
    assert_eq!(c.listeners[1].name, "udp");
    // The default (auto) applies to UDP too: reuseport per flow where it can run.
    assert_eq!(c.listeners[1].policy, DispatchPolicy::Auto);
    assert_eq!(c.ready_timeout, Duration::from_millis(1500));
}

#[test]
fn listeners_cli_replaces_file_and_policies() {
    let f = toml_file(
        "command = [\"app\"]\ndispatch = \"ip-hash\"\n[[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:8000\"\n[[listen]]\nname = \"admin\"\ndispatch = \"shared\"\n[[listen]]\nname = \"dns\"\nurl = \"udp://0.0.0.0:53\"\n",
    );
    let p = f.path().to_str().unwrap();
    let c = run(&["-c", p], &[]).unwrap();
    let got: Vec<_> = c
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.policy))
        .collect();
    assert_eq!(
        got,
        vec![
            ("web", DispatchPolicy::IpHash),
            ("admin", DispatchPolicy::Shared),
            ("dns", DispatchPolicy::Shared)
        ]
    );
    assert_eq!(c.listeners[1].addr, None);
    let c = run(&["-c", p, "-l", "unix:/run/x.sock"], &[]).unwrap();
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].name, "unix");
    assert_eq!(
        c.listeners[0].addr,
        Some(ListenAddr::Unix("/run/x.sock".into()))
    );
    let c = run(
        &["-c", p],
        &[("SOCKVISOR_LISTEN", "a=tcp://:1,b=udp://127.0.0.1:2")],
    )
    .unwrap();
    assert_eq!(c.listeners.len(), 2);
    assert_eq!(
        c.listeners[0].addr,
        Some(ListenAddr::Tcp("0.0.0.0:1".parse().unwrap()))
    );
}

#[test]
fn udp_with_non_shared_policy_is_an_error() {
    let f = toml_file("command = [\"app\"]\n[[listen]]\nname = \"dns\"\nurl = \"udp://127.0.0.1:53\"\ndispatch = \"round-robin\"\n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(e.contains(":2: listen:"), "{e}");
    assert!(
        e.contains("is UDP") && e.contains("use auto, reuseport or shared"),
        "{e}"
    );
    // A global channel policy simply does not apply to UDP.
    let c = run(
        &["--dispatch", "ip-hash", "-l", "udp://127.0.0.1:53", "app"],
        &[],
    )
    .unwrap();
    assert_eq!(c.listeners[0].policy, DispatchPolicy::Shared);
}

#[test]
fn duplicate_listener_names() {
    let e = err(
        &["-l", "tcp://127.0.0.1:1", "-l", "tcp://127.0.0.1:2", "app"],
        &[],
    );
    assert!(e.contains("two listeners are named \"tcp\""), "{e}");
}

#[test]
fn malformed_toml_names_file_and_line() {
    let f = toml_file("workers = 2\n\nready = \n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(
        e.starts_with(&format!("{}:3: invalid TOML", f.path().display())),
        "{e}"
    );
}

#[test]
fn unknown_key_suggests() {
    let f = toml_file("command = \"app\"\nwrkers = 2\n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(
        e.contains(":2: wrkers: unknown key `wrkers` (did you mean `workers`?)"),
        "{e}"
    );
    let f = toml_file("[[listen]]\nnmae = \"web\"\n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(
        e.contains(":2:") && e.contains("did you mean `name`?"),
        "{e}"
    );
    let e = err(&["--wrokers", "2", "app"], &[]);
    assert!(
        e.contains("unknown option --wrokers (did you mean --workers?)"),
        "{e}"
    );
    let e = err(&["--zzzzzzzzzzzz", "app"], &[]);
    assert!(e.contains("unknown option --zzzzzzzzzzzz"), "{e}");
}

#[test]
fn wrong_values_name_their_source() {
    let f = toml_file("command = \"app\"\n\nworkers = \"abc\"\n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(
        e.contains(":3: workers: expected a positive integer, got \"abc\""),
        "{e}"
    );
    let f = toml_file("workers = true\n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(
        e.contains(":1: workers: expected a string or a number, got a boolean"),
        "{e}"
    );
    let e = err(&["app"], &[("SOCKVISOR_WORKERS", "0")]);
    assert!(
        e.starts_with("SOCKVISOR_WORKERS: expected a positive integer, got \"0\""),
        "{e}"
    );
    let e = err(&["--stop-timeout", "soon", "app"], &[]);
    assert!(e.starts_with("--stop-timeout: expected a duration"), "{e}");
    let e = err(&["--dispatch=random", "app"], &[]);
    assert!(
        e.contains("unknown dispatch policy") && e.contains("least-connections"),
        "{e}"
    );
    let e = err(&["--ready", "later", "app"], &[]);
    assert!(e.contains("expected \"exec\" or \"notify\""), "{e}");
    let e = err(&["-w"], &[]);
    assert!(e.contains("-w") || e.contains("--workers"), "{e}");
    let e = err(&["-l", "http://x:1", "app"], &[]);
    assert!(
        e.starts_with("--listen: bad listen address") && e.contains("tcp://HOST:PORT"),
        "{e}"
    );
}

#[test]
fn cross_checks() {
    let e = err(&["-w", "2", "--min-ready", "3", "app"], &[]);
    assert!(
        e.contains("min_ready = 3 is more than the 2 workers"),
        "{e}"
    );
    let e = err(&["-w", "2", "app"], &[("SOCKVISOR_MIN_HEALTHY", "5")]);
    assert!(e.starts_with("SOCKVISOR_MIN_HEALTHY:"), "{e}");
    let e = err(&["--window", "0", "app"], &[]);
    assert!(e.contains("--window: expected a positive integer"), "{e}");
    let e = err(&[], &[]);
    assert!(e.contains("no command") && e.contains("after `--`"), "{e}");
    let e = err(
        &["--restart-delay", "5s", "--restart-delay-max", "1s", "app"],
        &[],
    );
    assert!(e.contains("restart_delay_max"), "{e}");
    let c = run(
        &["-w", "3", "--min-ready", "all", "--min-healthy", "0", "app"],
        &[],
    )
    .unwrap();
    assert_eq!((c.min_ready, c.min_healthy), (None, 0));
}

#[test]
fn toml_types() {
    let f = toml_file(
        "command = [\"/bin/app\", \"-v\"]\nstop_timeout = 3\nready_timeout = \"2min\"\nfatal_exit_codes = [2, 78]\nworker_watchdog = \"500ms\"\nworkers = 0x10\n",
    );
    let c = run(&["-c", f.path().to_str().unwrap()], &[]).unwrap();
    assert_eq!(c.stop_timeout, Duration::from_secs(3));
    assert_eq!(c.ready_timeout, Duration::from_secs(120));
    assert_eq!(c.fatal_exit_codes, vec![2, 78]);
    assert_eq!(c.worker_watchdog, Some(Duration::from_millis(500)));
    assert_eq!(c.workers, 16);
    let f = toml_file("command = [\"app\", 3]\n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(
        e.contains(":1: command: expected an array of strings"),
        "{e}"
    );
    let f = toml_file("command = \"app\"\nfatal_exit_codes = [300]\n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(
        e.contains(":2: fatal_exit_codes: expected an exit code 0-255"),
        "{e}"
    );
    let e = err(&["-c", "/nonexistent/x.toml"], &[]);
    assert!(
        e.starts_with("/nonexistent/x.toml: cannot read the config file"),
        "{e}"
    );
}

#[test]
fn subcommands() {
    let sub = |a: &[&str]| {
        load(&Sources {
            args: args(a),
            env: vec![],
        })
        .unwrap()
    };
    match sub(&["status", "--json", "--control", "/run/x.sock"]) {
        Invocation::Status {
            target,
            json,
            check,
        } => {
            assert_eq!(target.control, PathBuf::from("/run/x.sock"));
            assert!(json && !check && target.explicit && target.name.is_none());
        }
        other => panic!("{other:?}"),
    }
    match sub(&["--control=/c.sock", "reload"]) {
        Invocation::Reload { target, canary } => {
            assert_eq!(target.control, PathBuf::from("/c.sock"));
            assert_eq!(canary, None);
        }
        other => panic!("{other:?}"),
    }
    match sub(&["scale", "6", "--control", "/c.sock"]) {
        Invocation::Scale { workers, .. } => assert_eq!(workers, 6),
        other => panic!("{other:?}"),
    }
    match sub(&["scale", "myapp", "3"]) {
        Invocation::Scale { workers, target } => {
            assert_eq!((workers, target.name.as_deref()), (3, Some("myapp")));
            assert!(!target.explicit);
        }
        other => panic!("{other:?}"),
    }
    match sub(&["status", "myapp", "--check"]) {
        Invocation::Status { target, check, .. } => {
            assert!(check && target.name.as_deref() == Some("myapp"));
        }
        other => panic!("{other:?}"),
    }
    match sub(&["metrics"]) {
        Invocation::Metrics { target } => assert!(target.name.is_none()),
        other => panic!("{other:?}"),
    }
    assert!(load(&Sources {
        args: args(&["reload", "--check"]),
        env: vec![],
    })
    .is_err());
    assert!(load(&Sources {
        args: args(&["status", "a", "b"]),
        env: vec![],
    })
    .is_err());
    // `--` makes it a program.
    match sub(&["--", "status"]) {
        Invocation::Run(c) => assert_eq!(c.command, vec!["status"]),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(sub(&["--help"]), Invocation::Help(t) if t.contains("--worker-watchdog") && t.contains("78"))
    );
    assert!(matches!(sub(&["-V"]), Invocation::Version));
    assert!(err(&["scale"], &[]).contains("needs a worker count"));
    assert!(err(&["scale", "x"], &[]).contains("expected a positive integer"));
    assert!(err(&["status", "app", "extra"], &[]).contains("unexpected argument"));
    assert!(err(&["status", "-w", "3"], &[]).contains("does not apply"));
    assert!(err(&["--json", "app"], &[]).contains("only applies"));
}

/// Issue 16: `signal`, `send`, `messages --follow`, and the `messages` switch.
#[test]
fn signal_send_and_messages_commands() {
    let sub = |a: &[&str]| {
        load(&Sources {
            args: args(a),
            env: vec![],
        })
        .unwrap()
    };
    match sub(&["signal", "usr1", "--slot", "2", "--control", "/c.sock"]) {
        Invocation::Signal {
            target,
            signal,
            slot,
            generation,
        } => {
            assert_eq!(target.control, PathBuf::from("/c.sock"));
            assert_eq!((signal.as_str(), slot, generation), ("usr1", Some(2), None));
        }
        other => panic!("{other:?}"),
    }
    match sub(&["signal", "--generation=3", "SIGHUP"]) {
        Invocation::Signal {
            generation, slot, ..
        } => assert_eq!((slot, generation), (None, Some(3))),
        other => panic!("{other:?}"),
    }
    match sub(&["send", "--slot", "0", "reopen logs"]) {
        Invocation::Send { slot, payload, .. } => {
            assert_eq!((slot, payload.as_str()), (Some(0), "reopen logs"))
        }
        other => panic!("{other:?}"),
    }
    // A fleet NAME first (issue 15): `send myapp PAYLOAD`, `signal myapp SIGNAL`.
    match sub(&["send", "myapp", "hello"]) {
        Invocation::Send {
            payload, target, ..
        } => {
            assert_eq!(
                (payload.as_str(), target.name.as_deref()),
                ("hello", Some("myapp"))
            )
        }
        other => panic!("{other:?}"),
    }
    match sub(&["signal", "myapp", "usr1"]) {
        Invocation::Signal { signal, target, .. } => {
            assert_eq!(
                (signal.as_str(), target.name.as_deref()),
                ("usr1", Some("myapp"))
            )
        }
        other => panic!("{other:?}"),
    }
    // A payload that starts with a dash comes after `--`.
    match sub(&["send", "--", "-x"]) {
        Invocation::Send { slot, payload, .. } => {
            assert_eq!((slot, payload.as_str()), (None, "-x"))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        sub(&["messages", "--follow", "--json"]),
        Invocation::Messages { json: true, .. }
    ));
    for (a, want) in [
        (&["signal"][..], "needs a signal"),
        (&["signal", "SIGKILL"], "SIGKILL is refused"),
        (&["signal", "SIGFOO"], "unknown signal"),
        (&["signal", "usr1", "--slot", "x"], "--slot"),
        (&["signal", "usr1", "--slot"], "needs a value"),
        (&["send"], "needs a payload"),
        (&["send", "a", "b", "c"], "unexpected argument"),
        (
            &["send", "--generation", "1", "x"],
            "only applies to `sockvisor signal`",
        ),
        (&["messages"], "needs --follow"),
        (
            &["status", "--follow"],
            "only applies to `sockvisor messages`",
        ),
        (
            &["--slot", "1", "app"],
            "only applies to `sockvisor signal` and `sockvisor send`",
        ),
    ] {
        let e = err(a, &[]);
        assert!(e.contains(want), "{a:?}: {e}");
    }
    // The switch: alone, with a value, from the environment and the file.
    assert!(run(&["--messages", "app"], &[]).unwrap().messages);
    assert!(!run(&["--messages=no", "app"], &[]).unwrap().messages);
    assert!(!run(&["app"], &[]).unwrap().messages);
    assert!(
        run(&["app"], &[("SOCKVISOR_MESSAGES", "on")])
            .unwrap()
            .messages
    );
    let e = err(&["app"], &[("SOCKVISOR_MESSAGES", "maybe")]);
    assert!(e.contains("expected true or false"), "{e}");
    let f = toml_file("command = \"app\"\nmessages = true\n");
    assert!(
        run(&["-c", f.path().to_str().unwrap()], &[])
            .unwrap()
            .messages
    );
    let f = toml_file("command = \"app\"\nmessages = [true]\n");
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(e.contains("expected true or false"), "{e}");
}

#[test]
fn control_socket_resolution() {
    let e = env(&[
        ("RUNTIME_DIRECTORY", "/run/app:/run/other"),
        ("XDG_RUNTIME_DIR", "/run/user/1000"),
    ]);
    assert_eq!(
        control_socket_path(Some(Path::new("/x.sock")), Some(Path::new("/rd")), None, &e),
        PathBuf::from("/x.sock")
    );
    assert_eq!(
        control_socket_path(None, Some(Path::new("/rd")), None, &e),
        PathBuf::from("/rd/control.sock")
    );
    assert_eq!(
        control_socket_path(None, None, None, &e),
        PathBuf::from("/run/app/control.sock")
    );
    let e = env(&[("XDG_RUNTIME_DIR", "/run/user/1000")]);
    let p = control_socket_path(None, None, Some(Path::new("/etc/sockvisor/web.toml")), &e);
    if nix::unistd::geteuid().is_root() {
        assert_eq!(p, PathBuf::from("/run/sockvisor/web.sock"));
    } else {
        assert_eq!(p, PathBuf::from("/run/user/1000/sockvisor/web.sock"));
        let p = control_socket_path(None, None, None, &[]);
        assert!(
            p.starts_with("/tmp/sockvisor-") && p.ends_with("sockvisor.sock"),
            "{p:?}"
        );
    }
    // The daemon and the client agree.
    let c = run(&["app"], &[("RUNTIME_DIRECTORY", "/run/q")]).unwrap();
    assert_eq!(c.control_socket, Some(PathBuf::from("/run/q/control.sock")));
}

#[test]
fn example_config_loads() {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sockvisor.toml");
    let c = run(&["-c", p], &[]).unwrap();
    assert_eq!(c.workers, 4);
    assert_eq!(c.listeners.len(), 3);
    assert_eq!(c.ready, ReadyMode::Notify);
    assert_eq!(c.fatal_exit_codes, vec![78]);
}

#[test]
fn never_panics_on_junk() {
    let junk = [
        "",
        "=",
        "[[listen]]",
        "[[listen]]\nurl = 3",
        "listen = 5",
        "listen = [1]",
        "command = []",
        "command = \"\"",
        "workers = -1",
        "workers = 99999999999999999999",
        "workers = 1.5",
        "window = {}",
        "a.b.c = 1",
        "[listen]\nname = \"x\"",
        "stop_timeout = \"9999999999999999h\"",
        "min_ready = \"all\"",
        "\u{0}",
        "command = [\"a\"]\nlisten = [\"web=tcp://1.2.3.4:1\", \"web=udp://1.2.3.4:1\"]",
    ];
    for j in junk {
        let f = toml_file(j);
        let _ = load(&Sources {
            args: args(&["-c", f.path().to_str().unwrap(), "x"]),
            env: vec![],
        });
    }
    for a in [
        &["-"][..],
        &["--="],
        &["-l"],
        &["--listen="],
        &["-c"],
        &["-c="],
        &["--", ""],
        &["scale", "-1"],
        &["-é"],
    ] {
        let _ = load(&Sources {
            args: args(a),
            env: vec![],
        });
    }
}

#[test]
fn never_panics_on_random_input() {
    // A deterministic LCG over TOML/CLI-ish fragments: bounded and reproducible.
    let frags = [
        "workers",
        "=",
        " ",
        "\n",
        "\"",
        "[[listen]]",
        "[",
        "]",
        "{",
        "}",
        ",",
        "1",
        "-1",
        "0x",
        "1.5",
        "s",
        "ms",
        "min",
        "tcp://",
        "udp://",
        "unix:",
        "[::1]",
        ":",
        "80",
        "name",
        "url",
        "dispatch",
        "shared",
        "command",
        "'",
        "#",
        "window",
        "min_ready",
        "all",
        "=web",
        "é",
        "\u{0}",
        "true",
        "listen",
        "--",
        "-w",
        "-l",
        "--listen=",
        "status",
        "scale",
        "-c",
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    for _ in 0..3000 {
        let n = next() % 12;
        let text: String = (0..n).map(|_| frags[next() % frags.len()]).collect();
        let _ = file_layer(Path::new("fuzz.toml"), &text)
            .map(|l| resolve(l, None, PathBuf::from("/c")));
        let _ = parse_listen(&text);
        let _ = parse_duration(&text);
        let argv: Vec<OsString> = (0..n)
            .map(|_| OsString::from(frags[next() % frags.len()]))
            .collect();
        let _ = parse_cli(&argv);
    }
}

/// Issue 14 item 1: the worker count is bounded wherever it enters, with a clear error.
#[test]
fn worker_count_is_bounded() {
    let too_many = (WORKERS_CEILING + 1).to_string();
    let f = toml_file(&format!("command = \"app\"\n\nworkers = {too_many}\n"));
    let e = err(&["-c", f.path().to_str().unwrap()], &[]);
    assert!(
        e.contains(":3: workers: 1025 is more than the maximum of 1024 workers"),
        "{e}"
    );
    let e = err(&["app"], &[("SOCKVISOR_WORKERS", &too_many)]);
    assert!(e.starts_with("SOCKVISOR_WORKERS: 1025 is more than"), "{e}");
    let e = err(&["-w", "100000", "app"], &[]);
    assert!(e.starts_with("--workers: 100000 is more than"), "{e}");
    if max_workers(1) == WORKERS_CEILING {
        let c = run(&["-w", &WORKERS_CEILING.to_string(), "app"], &[]).unwrap();
        assert_eq!(c.workers, WORKERS_CEILING, "the ceiling itself is allowed");
    }
    for n in ["100000", "18446744073709551615", "99999999999999999999999"] {
        let e = err(&["scale", n], &[]);
        assert!(e.contains("too large") && e.contains("at most 1024"), "{e}");
    }
    // The default never passes the limit.
    assert!(run(&["app"], &[]).unwrap().workers <= max_workers(1));
}

/// Issue 14 item 20: `PORT`, `:PORT`, `NAME=PORT`, `NAME=:PORT` are TCP on all addresses, on
/// the command line, in the environment and in the file.
#[test]
fn a_bare_port_is_a_tcp_listener_on_all_addresses() {
    let all = |port| {
        Some(ListenAddr::Tcp(SocketAddr::new(
            values::all_addresses(),
            port,
        )))
    };
    let c = run(&["-l", "8000", "-l", "admin=:9000", "app"], &[]);
    let c = c.unwrap();
    assert_eq!(
        (c.listeners[0].name.as_str(), &c.listeners[0].addr),
        ("tcp", &all(8000))
    );
    assert_eq!(
        (c.listeners[1].name.as_str(), &c.listeners[1].addr),
        ("admin", &all(9000))
    );
    assert_eq!(c.listeners[0].policy, DispatchPolicy::Auto);
    let c = run(
        &["app"],
        &[("SOCKVISOR_LISTEN", ":8000,dns=udp://127.0.0.1:53")],
    )
    .unwrap();
    assert_eq!(c.listeners[0].addr, all(8000));
    let f = toml_file("command = \"app\"\nlisten = [\"web=8000\"]\n");
    let c = run(&["-c", f.path().to_str().unwrap()], &[]).unwrap();
    assert_eq!(
        (c.listeners[0].name.as_str(), &c.listeners[0].addr),
        ("web", &all(8000))
    );
    let f = toml_file("command = \"app\"\n[[listen]]\nname = \"web\"\nurl = \":8000\"\n");
    let c = run(&["-c", f.path().to_str().unwrap()], &[]).unwrap();
    assert_eq!(c.listeners[0].addr, all(8000));
    // A name that is not a port is still a socket systemd passes.
    let c = run(&["-l", "web", "app"], &[]).unwrap();
    assert_eq!(
        (c.listeners[0].name.as_str(), &c.listeners[0].addr),
        ("web", &None)
    );
    for bad in ["99999", "web=99999", ":99999"] {
        let e = err(&["-l", bad, "app"], &[]);
        assert!(e.contains("0-65535"), "{e}");
    }
}

/// Issue 14 item 21: every error is `[FILE[:LINE]: ][KEY: ]MESSAGE[ (FIX)]`, one line, and
/// says nothing twice.
#[test]
fn error_lines_say_nothing_twice() {
    let bad_key = toml_file("command = \"app\"\nwrkers = 2\n");
    let bad_listen = toml_file("[[listen]]\nnmae = \"web\"\n");
    let bad_key = bad_key.path().to_str().unwrap();
    let bad_listen = bad_listen.path().to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["-c", bad_key],
        &["-c", bad_listen],
        &["-c", "/nonexistent/x.toml"],
        &["--wrokers", "2", "app"],
        &["--zzzzzzzzzzzz", "app"],
        &["--json", "app"],
        &["-l", "tcp://nowhere", "app"],
        &["-l", "tcp://127.0.0.1:1", "-l", "tcp://127.0.0.1:2", "app"],
        &["--restart-delay", "5s", "--restart-delay-max", "1s", "app"],
        &["-w", "100000", "app"],
        &["scale", "100000"],
        &["-w"],
    ];
    for a in cases {
        let e = err(a, &[]);
        assert!(!e.contains('\n'), "{a:?}: {e}");
        assert_eq!(repeated_phrase(&e), None, "{a:?}: {e}");
        // At most one parenthesis, the fix, at the end.
        let fix_at = e.find(" (").map_or(e.len(), |i| i + 2);
        assert!(
            !e[fix_at..].trim_end_matches(')').contains(['(', ')']),
            "{a:?}: a parenthesis in the fix: {e}"
        );
    }
}

/// A word said twice in a row, or three words said twice.
fn repeated_phrase(line: &str) -> Option<String> {
    let words: Vec<String> = line
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.'))
        .map(|w| {
            w.trim_matches(|c| c == '-' || c == '.')
                .to_ascii_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    if let Some(w) = words.windows(2).find(|w| w[0] == w[1]) {
        return Some(w.join(" "));
    }
    let triples: Vec<String> = words.windows(3).map(|w| w.join(" ")).collect();
    triples
        .iter()
        .enumerate()
        .find(|(i, t)| triples[i + 1..].contains(t))
        .map(|(_, t)| t.clone())
}

#[test]
fn repeated_phrases_are_found() {
    assert_eq!(
        repeated_phrase("EADDRINUSE: Address already in use: the address is already in use"),
        Some("already in use".into())
    );
    assert_eq!(
        repeated_phrase("--json: --json only applies"),
        Some("json json".into())
    );
    assert_eq!(repeated_phrase("workers: 3 is more than 2"), None);
}

/// Every key set at once (from the environment) resolves: `resolve` reads each key as the
/// type its kind gives (a mismatch would panic here rather than for a user).
#[test]
fn every_key_set_resolves() {
    use super::keys::{Kind, KEYS};
    let sample = |kind| match kind {
        Kind::Count { min: 100, .. } => "200",
        Kind::Count { .. } | Kind::CountOrAll | Kind::CountOrAuto => "1",
        Kind::OptPercent => "10%",
        Kind::OptBytes => "64M",
        Kind::OptTcp => "tcp://127.0.0.1:0",
        Kind::Duration | Kind::OptDuration => "1s",
        Kind::Text => "nobody",
        Kind::Path => "/run/x",
        Kind::Policy => "shared",
        Kind::Ready => "notify",
        Kind::Choice(words) => words[words.len() - 1],
        Kind::Switch => "yes",
        Kind::ExitCodes => "2",
        Kind::Command => "app",
        Kind::Listen => "tcp://127.0.0.1:0",
    };
    let e: Vec<(&str, &str)> = KEYS.iter().map(|k| (k.env, sample(k.kind))).collect();
    let c = run(&[], &e).unwrap();
    assert_eq!((c.workers, c.window, c.min_ready), (1, 1, Some(1)));
    assert_eq!(c.user.as_deref(), Some("nobody"));
    assert_eq!(c.runtime_dir, Some(PathBuf::from("/run/x")));
    assert_eq!(c.worker_watchdog, Some(Duration::from_secs(1)));
    assert!(c.control_socket_explicit);
    assert!(c.messages);
}

/// Issue 16: canary and health check keys, and their errors.
#[test]
fn canary_and_health_check_keys() {
    let c = run(
        &[
            "--canary-share",
            "12.5%",
            "--canary-by",
            "client",
            "--health-check",
            "http",
            "--health-check-request",
            "GET /healthz HTTP/1.1",
            "--",
            "app",
        ],
        &[("SOCKVISOR_WEIGHT", "3"), ("SOCKVISOR_CANARY_WORKERS", "2")],
    )
    .unwrap();
    assert_eq!(c.weight, 3);
    assert_eq!(
        c.canary,
        CanaryConfig {
            workers: 2,
            share_permille: Some(125),
            by_client: true,
            observe: Duration::from_secs(60),
        }
    );
    let h = c.health_check.unwrap();
    assert_eq!(
        h.kind,
        CheckKind::Http {
            request: "GET /healthz HTTP/1.1".into(),
            status: 200
        }
    );
    assert_eq!(
        (h.interval, h.timeout, h.passes, h.fails),
        (Duration::from_secs(5), Duration::from_secs(2), 2, 3)
    );
    let plain = run(&["--", "app"], &[]).unwrap();
    assert_eq!(
        (
            plain.weight,
            plain.canary.workers,
            plain.canary.share_permille
        ),
        (1, 0, None)
    );
    assert!(plain.health_check.is_none());
    let e = err(&["--canary-share", "150%", "--", "app"], &[]);
    assert!(
        e.contains("--canary-share") && e.contains("percentage"),
        "{e}"
    );
    let e = err(&["--health-check", "udp", "--", "app"], &[]);
    assert!(e.contains("use none or tcp or http"), "{e}");
    let e = err(&["--weight", "0", "--", "app"], &[]);
    assert!(e.contains("--weight"), "{e}");
    let e = err(
        &[
            "--health-check",
            "tcp",
            "--health-check-timeout",
            "0",
            "--",
            "app",
        ],
        &[],
    );
    assert!(
        e.contains("health_check_timeout") || e.contains("--health-check-timeout"),
        "{e}"
    );
}

#[test]
fn reload_takes_canary() {
    let inv = load(&Sources {
        args: args(&["reload", "--canary", "2", "--control", "/c.sock"]),
        env: Vec::new(),
    })
    .unwrap();
    match inv {
        Invocation::Reload { canary, .. } => assert_eq!(canary, Some(2)),
        other => panic!("{other:?}"),
    }
    let e = err(&["status", "--canary", "1"], &[]);
    assert!(e.contains("only applies to `sockvisor reload`"), "{e}");
    let e = err(&["reload", "--canary", "x"], &[]);
    assert!(e.contains("--canary"), "{e}");
}
