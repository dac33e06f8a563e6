//! `--help` and the reference table of docs/config.md, both produced from the table of keys.

use super::keys::{self, Key, Setting, CONFIG_FILE, KEYS, LOG_LEVEL};
use super::resolve::WORKERS_CEILING;

const WIDTH: usize = 80;
/// Where option descriptions start.
const COLUMN: usize = 30;

/// `text` and then `tail` (kept whole) wrapped to [`WIDTH`], every line after the first
/// indented to [`COLUMN`].
fn wrap(text: &str, tail: Option<&str>) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace().chain(tail) {
        if !line.is_empty() && COLUMN + line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            out.push_str(&" ".repeat(COLUMN));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out
}

fn option_line(left: &str, text: &str, tail: Option<&str>) -> String {
    format!("{left:<w$} {}\n", wrap(text, tail), w = COLUMN - 1)
}

fn key_option(key: &Key) -> Option<String> {
    let flag = flag_with_arg(key)?;
    let left = match key.short {
        Some(c) => format!("  -{c}, {flag}"),
        None => format!("      {flag}"),
    };
    // Unset keys are off or empty by default: nothing to say.
    let default = match key.default {
        keys::Default::Value(t) | keys::Default::Computed(t) => Some(format!("(default: {t})")),
        keys::Default::Unset(_) | keys::Default::Required => None,
    };
    Some(option_line(&left, key.help, default.as_deref()))
}

fn setting_option(s: &Setting) -> String {
    let env = format!("(env {})", s.env);
    option_line(
        &format!("  {}", s.flag.unwrap_or_default()),
        s.help,
        Some(&env),
    )
}

/// The `--help` text (complete: the man page is generated from it with help2man).
pub fn help_text() -> String {
    let options: String = KEYS.iter().filter_map(key_option).collect();
    format!(
        r#"sockvisor {version} - one socket, N workers of any language, natively on systemd

Usage:
  sockvisor [OPTIONS] [--] COMMAND [ARGS]...   run a fleet of COMMAND workers
  sockvisor status [NAME] [--json | --check] [--control PATH] [-c FILE]
  sockvisor reload [NAME] [--canary N] [--control PATH] [-c FILE]
  sockvisor scale [NAME] N [--control PATH] [-c FILE]
  sockvisor signal [NAME] SIGNAL [--slot N] [--generation G] [--control PATH]
  sockvisor send [NAME] [--slot N] [--] PAYLOAD [--control PATH] [-c FILE]
  sockvisor messages [NAME] --follow [--json] [--control PATH] [-c FILE]
  sockvisor metrics [NAME] [--control PATH] [-c FILE]

sockvisor takes its sockets from systemd (LISTEN_FDS/LISTEN_FDNAMES) or binds
the --listen addresses itself and forks the workers. By default (--dispatch
auto) each worker gets its own listening socket at fd 3, all in one SO_REUSEPORT
group, and a small eBPF program sends each new connection to the next ready
worker in turn (each UDP flow to one worker): a program written for socket
activation runs unchanged, with round robin. Where that cannot run (no CAP_BPF
or CAP_SYS_ADMIN, Linux < 5.14, another uid than the socket's) the workers share
the socket (shared) and the log and `status` say why. The channel policies hand
each accepted connection to a worker over SCM_RIGHTS instead (workers that speak
sockvisor's channel protocol). Options stop at the first word that is not an
option, or at `--`; the command may also come from the config file.

Options (every option is also a config key and a SOCKVISOR_* variable;
command line > environment > config file):
{config}{options}  -h, --help                  print this help
  -V, --version               print the version

Durations: 500ms, 10s, 1.5s, 2min (or 2m), 1h, or a plain number of seconds.
Values take the form --option VALUE or --option=VALUE (-w4 and -w 4 both work).
At most {ceiling} workers, fewer when the hard fd limit is low (docs/config.md).

Commands (talk to a running sockvisor over its control socket):
  status [--json]             the fleet's state, one line per worker
  status --check              exit 0 when ready, 1 when not (the reason is
                              printed), 2 when no fleet answers: exec probes
  reload                      re-read the config and replace the workers in a
                              new generation (also: systemctl reload, SIGHUP)
  scale N                     change the number of workers
  signal SIGNAL               send SIGNAL (SIGUSR1, usr1, 10, ...) to
                              every worker, or those of --slot N or
                              --generation G; prints the pids it reached.
                              SIGKILL and SIGSTOP are refused
  send [--slot N] PAYLOAD     a message to the worker of slot N, or to every
                              worker (needs messages = true, docs/messages.md)
  messages --follow [--json]  print the messages workers send to the operator
                              as they come (--json: one JSON object a line)
  metrics                     the Prometheus metrics (as GET /metrics serves)
NAME is a systemd unit (myapp, sockvisor@web) or a running fleet's socket
name; without NAME or --control, a shell finds the running fleet itself.
To run a program literally called status, reload, scale, signal, send,
messages or metrics, put it after `--`.

The control socket is --control/control_socket; else runtime_dir/control.sock;
else $RUNTIME_DIRECTORY/control.sock; else /run/sockvisor/INSTANCE.sock as root;
else $XDG_RUNTIME_DIR/sockvisor/INSTANCE.sock;
else /tmp/sockvisor-UID/INSTANCE.sock, INSTANCE being the config file's name
without .toml, or sockvisor.

Environment:
  SOCKVISOR_<KEY>             any config key, e.g. SOCKVISOR_WORKERS=8,
                              SOCKVISOR_LISTEN=web=tcp://:8000,dns=udp://:53
                              (lists comma-separated, the command split on
                              spaces)
{config_env}{log_env}  LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID, NOTIFY_SOCKET, WATCHDOG_USEC
                              set by systemd; never passed on to workers
Workers get LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID (their own),
SOCKVISOR_WORKER_ID (their slot, 0..N-1) and NOTIFY_SOCKET (sockvisor's); with
messages = true also SOCKVISOR_MESSAGES_FD (their message socket, the fd after
the LISTEN_FDS ones).

Signals: SIGTERM stops (after drain_delay, /readyz failing meanwhile); SIGINT
and SIGQUIT stop at once; SIGHUP reloads; SIGTTIN/SIGTTOU add/remove a worker.

Exit status:
  0    clean stop
  69   the fleet could not stay up (every slot kept failing)
  70   internal error
  78   configuration or usage error (units: RestartPreventExitStatus=78)

See docs/config.md for the config file.
"#,
        version = env!("CARGO_PKG_VERSION"),
        config = setting_option(&CONFIG_FILE),
        ceiling = WORKERS_CEILING,
        config_env = option_line(
            &format!("  {}", CONFIG_FILE.env),
            "config file, when -c is not given",
            None
        ),
        log_env = option_line(&format!("  {}", LOG_LEVEL.env), LOG_LEVEL.help, None),
    )
}

/// `--workers N`; a switch's value is optional, so it is attached: `--messages[=BOOL]`.
fn flag_with_arg(key: &Key) -> Option<String> {
    let sep = if key.kind == keys::Kind::Switch {
        ""
    } else {
        " "
    };
    Some(format!("{}{sep}{}", key.flag?, key.arg))
}

/// `-w, --workers N` as Markdown: `` `-w`, `--workers N` ``.
fn doc_flag(key: &Key) -> String {
    let Some(flag) = flag_with_arg(key) else {
        return format!("`[--] {}`", key.arg);
    };
    let mut s = String::new();
    if let Some(c) = key.short {
        s.push_str(&format!("`-{c}`, "));
    }
    // A `|` would end the Markdown table's cell.
    s.push_str(&format!("`{}`", flag.replace('|', "\\|")));
    if key.kind == keys::Kind::Listen {
        s.push_str(" (repeatable)");
    }
    s
}

fn doc_default(key: &Key) -> String {
    match key.default {
        keys::Default::Value(t) => format!("`{t}`"),
        keys::Default::Unset(t) | keys::Default::Computed(t) => t.to_string(),
        keys::Default::Required => "(required)".to_string(),
    }
}

/// The Markdown table of every key (TOML name, variable, flag, default, meaning) that
/// docs/config.md holds between its `BEGIN generated` and `END generated` markers.
pub fn reference_table() -> String {
    let mut t = String::from(
        "| TOML key | environment | flag | default | meaning |\n|---|---|---|---|---|\n",
    );
    for k in KEYS {
        t.push_str(&format!(
            "| `{}` | `{}` | {} | {} | {} |\n",
            k.name,
            k.env,
            doc_flag(k),
            doc_default(k),
            k.doc
        ));
    }
    for s in [CONFIG_FILE, LOG_LEVEL] {
        let flag = match s.flag {
            Some(f) => f
                .split(", ")
                .map(|part| format!("`{part}`"))
                .collect::<Vec<_>>()
                .join(", "),
            None => "(none)".to_string(),
        };
        t.push_str(&format!(
            "| (none) | `{}` | {flag} | {} | {} |\n",
            s.env, s.default, s.help
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC_BEGIN: &str = "<!-- BEGIN generated from src/config/keys.rs: UPDATE_DOCS=1 cargo test --lib config::help rewrites it -->\n";
    const DOC_END: &str = "<!-- END generated -->\n";

    /// docs/config.md lists exactly the table of keys. `UPDATE_DOCS=1` rewrites the doc's
    /// table instead of failing.
    #[test]
    fn docs_config_md_matches_the_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let (start, end) = match (doc.find(DOC_BEGIN), doc.find(DOC_END)) {
            (Some(s), Some(e)) if s < e => (s + DOC_BEGIN.len(), e),
            _ => panic!("docs/config.md lacks the markers {DOC_BEGIN:?} ... {DOC_END:?}"),
        };
        let want = reference_table();
        if doc[start..end] == want {
            return;
        }
        if std::env::var_os("UPDATE_DOCS").is_some_and(|v| v == "1") {
            std::fs::write(path, format!("{}{want}{}", &doc[..start], &doc[end..])).unwrap();
            return;
        }
        let stale: Vec<&str> = doc[start..end]
            .lines()
            .filter(|l| !want.lines().any(|w| w == *l))
            .collect();
        panic!(
            "docs/config.md's table of keys is stale (run UPDATE_DOCS=1 cargo test --lib config::help); lines not in the table: {stale:#?}"
        );
    }

    /// The maximum worker count's section says what the code does.
    #[test]
    fn docs_state_the_worker_limit() {
        let doc = include_str!("../../docs/config.md");
        let ceiling = format!("at most **{WORKERS_CEILING}** workers");
        let reserved = format!("keeps {} fds", super::super::resolve::RESERVED_FDS);
        assert!(doc.contains(&ceiling) && doc.contains(&reserved));
    }

    #[test]
    fn help_lists_every_option_within_80_columns() {
        let help = help_text();
        for k in KEYS {
            if let Some(flag) = flag_with_arg(k) {
                assert!(help.contains(&flag), "{flag}");
            }
        }
        assert!(help.contains("-w, --workers N") && help.contains("-c, --config FILE"));
        assert!(help.contains("(default: 30s)") && help.contains("SOCKVISOR_LOG"));
        assert!(help.contains(&format!("At most {WORKERS_CEILING} workers")));
        for line in help.lines() {
            assert!(line.chars().count() <= WIDTH, "too long: {line:?}");
        }
    }
}
