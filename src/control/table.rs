//! The human `sockvisor status`: a summary line, the listeners, then one row per worker.
//!
//! Every text field goes through [`printable`]: a worker's `STATUS=`, a listener's name or
//! anything else in the reply cannot move the cursor, recolour or retitle the terminal.

use super::protocol::{FleetStatus, MessageTotals};

/// `text` with every control character (C0, DEL, C1: escape sequences, newlines, ...)
/// replaced by a space.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `3s`, `5m12s`, `2h3m`, `4d5h`.
pub fn format_uptime(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn columns(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The table `sockvisor status` prints.
pub fn format_status_table(status: &FleetStatus) -> String {
    let mut out = format!(
        "sockvisor {} (pid {}, generation {}): {}\n",
        printable(&status.state),
        status.pid,
        status.generation,
        printable(&status.summary)
    );
    if let Some(why) = &status.not_ready {
        out.push_str(&format!("not ready: {}\n", printable(why)));
    }
    if !status.listeners.is_empty() {
        out.push('\n');
        let mut rows = vec![header(&[
            "LISTENER", "ADDRESS", "POLICY", "ACCEPTED", "PENDING",
        ])];
        for l in &status.listeners {
            rows.push(vec![
                printable(&l.name),
                printable(&l.address),
                printable(&l.policy),
                l.accepted.map_or("-".to_string(), |a| a.to_string()),
                l.pending.to_string(),
            ]);
        }
        out.push_str(&columns(&rows));
        for l in &status.listeners {
            if let Some(note) = &l.policy_note {
                out.push_str(&format!(
                    "{}: {}, {}\n",
                    printable(&l.name),
                    printable(&l.policy),
                    printable(note)
                ));
            }
        }
    }
    if let Some(c) = &status.canary {
        out.push_str(&format!(
            "canary: generation {} ({} workers), {}, {}{}; {}\n",
            c.generation,
            c.pids.len(),
            printable(&c.share),
            printable(&c.phase),
            c.observe_left_secs
                .map_or(String::new(), |s| format!(" ({} left)", format_uptime(s))),
            printable(&c.health)
        ));
    }
    out.push('\n');
    if status.workers.is_empty() {
        out.push_str("(no workers)\n");
        return out;
    }
    let checks = status.workers.iter().any(|w| w.health_check.is_some());
    let weights = status.workers.iter().any(|w| w.weight != 1);
    let mut names = vec!["SLOT", "PID", "GEN"];
    if weights {
        names.push("WEIGHT");
    }
    names.extend([
        "STATE",
        "UPTIME",
        "RESTARTS",
        "DISPATCHED",
        "QUEUED",
        "OPEN",
    ]);
    if checks {
        names.push("CHECK");
    }
    names.push("STATUS");
    let mut rows = vec![header(&names)];
    for w in &status.workers {
        let mut state = printable(&w.state);
        if w.canary {
            state.push_str(",canary");
        }
        if w.out_of_rotation {
            state.push_str(",out-of-rotation");
        }
        let mut row = vec![
            w.slot.to_string(),
            w.pid.to_string(),
            w.generation.to_string(),
        ];
        if weights {
            row.push(w.weight.to_string());
        }
        row.extend([
            state,
            format_uptime(w.uptime_secs),
            w.restarts.to_string(),
            w.dispatched.to_string(),
            w.queued.to_string(),
            w.open.map_or_else(|| "-".to_string(), |o| o.to_string()),
        ]);
        if checks {
            row.push(match &w.health_check {
                Some(c) => printable(c.last.as_deref().unwrap_or("not yet")),
                None => "-".to_string(),
            });
        }
        row.push(printable(w.status.as_deref().unwrap_or("-")));
        rows.push(row);
    }
    out.push_str(&columns(&rows));
    let mut slots_told = Vec::new();
    for w in &status.workers {
        if let Some(last) = w
            .last_exit
            .as_deref()
            .filter(|_| !slots_told.contains(&w.slot))
        {
            slots_told.push(w.slot);
            out.push_str(&format!(
                "slot {}: last exit: {}\n",
                w.slot,
                printable(last)
            ));
        }
    }
    if let Some(m) = &status.messages {
        out.push_str(&messages_table(status, m));
    }
    out
}

/// With `messages = true`: the fleet's figures, then one row per worker that has a
/// message socket.
fn messages_table(status: &FleetStatus, m: &MessageTotals) -> String {
    let mut out = format!(
        "
messages: {} delivered, {} to the operator ({} unheard), {} undeliverable, {} dropped, {} malformed; {} following
",
        m.totals.delivered,
        m.totals.to_operator,
        m.totals.unheard,
        m.totals.undeliverable,
        m.totals.dropped,
        m.totals.malformed,
        m.followers
    );
    let mut rows = vec![header(&[
        "SLOT", "PID", "SENT", "RECEIVED", "QUEUED", "DROPPED",
    ])];
    for w in &status.workers {
        if let Some(f) = &w.messages {
            rows.push(
                [
                    w.slot as u64,
                    w.pid as u64,
                    f.sent,
                    f.received,
                    f.queued,
                    f.dropped,
                ]
                .iter()
                .map(u64::to_string)
                .collect(),
            );
        }
    }
    if rows.len() > 1 {
        out.push('\n');
        out.push_str(&columns(&rows));
    }
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::control::{ListenerStatus, WorkerStatus};

    pub(in crate::control) fn sample_status() -> FleetStatus {
        FleetStatus {
            pid: 4242,
            generation: 2,
            state: "running".into(),
            ready: true,
            not_ready: None,
            workers_wanted: 2,
            summary: "2/2 workers ready".into(),
            workers: vec![
                WorkerStatus {
                    slot: 0,
                    pid: 100,
                    generation: 2,
                    state: "ready".into(),
                    uptime_secs: 312.4,
                    restarts: 1,
                    dispatched: 1000,
                    queued: 3,
                    open: Some(7),
                    status: Some("serving".into()),
                    weight: 1,
                    out_of_rotation: false,
                    canary: false,
                    health_check: None,
                    messages: None,
                    last_exit: None,
                },
                WorkerStatus {
                    slot: 1,
                    pid: 101,
                    generation: 2,
                    state: "starting".into(),
                    uptime_secs: 3.0,
                    restarts: 0,
                    dispatched: 0,
                    queued: 0,
                    open: None,
                    status: None,
                    weight: 1,
                    out_of_rotation: false,
                    canary: false,
                    health_check: None,
                    messages: None,
                    last_exit: None,
                },
            ],
            listeners: vec![ListenerStatus {
                name: "web".into(),
                address: "tcp://127.0.0.1:8000".into(),
                policy: "round-robin".into(),
                policy_note: None,
                accepted: Some(1000),
                pending: 0,
            }],
            canary: None,
            messages: None,
        }
    }

    #[test]
    fn status_table_shows_weights_canary_and_checks() {
        let mut s = sample_status();
        s.workers[1].weight = 3;
        s.workers[1].canary = true;
        s.workers[0].out_of_rotation = true;
        s.workers[0].health_check = Some(crate::control::CheckStatus {
            passes: 4,
            failures: 1,
            consecutive_passes: 0,
            consecutive_failures: 1,
            last: Some("failed: HTTP 500 in 1ms".into()),
        });
        s.canary = Some(crate::control::CanaryStatus {
            generation: 2,
            pids: vec![101],
            share: "10% by weight".into(),
            phase: "observing".into(),
            observe_left_secs: Some(42.0),
            health: "no active checks; watching for exits and kills".into(),
        });
        let t = format_status_table(&s);
        assert!(
            t.contains("canary: generation 2 (1 workers), 10% by weight, observing (42s left); no active checks"),
            "{t}"
        );
        assert!(t.contains("WEIGHT") && t.contains("CHECK"), "{t}");
        assert!(
            t.contains("ready,out-of-rotation") && t.contains("failed: HTTP 500 in 1ms"),
            "{t}"
        );
        assert!(t.contains("starting,canary"), "{t}");
    }

    #[test]
    fn status_table() {
        let t = format_status_table(&sample_status());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "sockvisor running (pid 4242, generation 2): 2/2 workers ready"
        );
        assert!(lines[2].starts_with("LISTENER  ADDRESS"));
        assert!(lines[3].starts_with("web       tcp://127.0.0.1:8000  round-robin  1000"));
        assert!(lines[5].starts_with("SLOT  PID  GEN  STATE     UPTIME  RESTARTS  DISPATCHED"));
        assert_eq!(
            lines[6],
            "0     100  2    ready     5m12s   1         1000        3       7     serving"
        );
        assert_eq!(
            lines[7],
            "1     101  2    starting  3s      0         0           0       -     -"
        );
        assert_eq!(format_uptime(7380.0), "2h3m");
        assert_eq!(format_uptime(-1.0), "0s");
        assert_eq!(format_uptime(f64::NAN), "0s");
        assert_eq!(format_uptime(90000.0), "1d1h");
        assert!(
            !t.contains("messages"),
            "no message section when messages are off"
        );
    }

    #[test]
    fn messages_section() {
        let mut s = sample_status();
        s.messages = Some(MessageTotals {
            totals: crate::messages::Totals {
                delivered: 10,
                to_operator: 2,
                unheard: 1,
                undeliverable: 0,
                dropped: 5,
                malformed: 0,
            },
            followers: 1,
        });
        s.workers[0].messages = Some(crate::control::WorkerMessages {
            sent: 4,
            received: 6,
            queued: 128,
            dropped: 5,
        });
        let t = format_status_table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[9],
            "messages: 10 delivered, 2 to the operator (1 unheard), 0 undeliverable, 5 dropped, 0 malformed; 1 following"
        );
        assert_eq!(lines[11], "SLOT  PID  SENT  RECEIVED  QUEUED  DROPPED");
        assert_eq!(lines[12], "0     100  4     6         128     5");
        assert_eq!(lines.len(), 13, "{t}");
    }

    /// Every text field the table prints, not only the worker's STATUS=.
    #[test]
    fn no_control_character_reaches_the_terminal() {
        let evil = "a\x1b]0;owned\x07b\x1b[2J\r\n\u{9b}31mc\x7f";
        let mut s = sample_status();
        s.state = evil.into();
        s.summary = evil.into();
        s.listeners[0].name = evil.into();
        s.listeners[0].address = evil.into();
        s.listeners[0].policy = evil.into();
        s.workers[0].state = evil.into();
        s.workers[0].status = Some(evil.into());
        let t = format_status_table(&s);
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        // One line per row: no embedded newline either.
        assert_eq!(t.lines().count(), 8, "{t}");
        assert!(t.contains("a ]0;owned b [2J   31mc "), "{t:?}");
    }
}
