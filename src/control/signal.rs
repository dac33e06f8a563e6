//! Signal names for `sockvisor signal SIGNAL` (docs/control.md): what may be sent to
//! workers, checked by the client before it connects and by the server again.
//!
//! Accepted: a standard signal's name with or without `SIG`, in any case (`SIGUSR1`,
//! `usr1`), or its number (`10`). Refused, with the reason: `SIGKILL` and `SIGSTOP` (a
//! worker cannot handle them: they do not tell it anything, they kill or freeze it behind
//! sockvisor's back), 0 (not a signal), real-time signals (32 and up: not supported),
//! unknown names and numbers.

use nix::sys::signal::Signal;
use std::fmt;

/// A signal that may be sent to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSignal(Signal);

const NAMES: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("POLL", libc::SIGPOLL),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

impl WorkerSignal {
    pub fn signal(self) -> Signal {
        self.0
    }

    pub fn number(self) -> i32 {
        self.0 as i32
    }

    /// `SIGUSR1`.
    pub fn name(self) -> &'static str {
        self.0.as_str()
    }

    /// Parse and check a signal given by name or number.
    pub fn parse(text: &str) -> Result<WorkerSignal, String> {
        let t = text.trim();
        let upper = t.to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        let number = if let Ok(n) = t.parse::<i64>() {
            Some(n)
        } else if let Some((_, n)) = NAMES.iter().find(|(name, _)| *name == bare) {
            Some(i64::from(*n))
        } else if bare.starts_with("RT") {
            Some(i64::from(libc::SIGRTMIN()))
        } else {
            None
        };
        let unknown = || {
            format!(
                "unknown signal {t:?}: give a name (SIGUSR1, USR1, SIGHUP, ...) or a number from 1 to {}",
                libc::SIGSYS
            )
        };
        let Some(n) = number else {
            return Err(unknown());
        };
        match i32::try_from(n).map(Signal::try_from) {
            _ if n == 0 => {
                Err("0 is not a signal (give SIGUSR1, SIGHUP, ... or a number from 1)".into())
            }
            Ok(Ok(Signal::SIGKILL)) => Err("SIGKILL is refused: a worker cannot handle it, it would only die and be restarted as after a crash; to replace workers use `sockvisor reload`".into()),
            Ok(Ok(Signal::SIGSTOP)) => Err("SIGSTOP is refused: a worker cannot handle it, it would freeze while sockvisor still sends it connections (until it is found wedged and killed)".into()),
            Ok(Ok(sig)) => Ok(WorkerSignal(sig)),
            _ if n > i64::from(libc::SIGSYS) && n <= i64::from(libc::SIGRTMAX()) => Err(format!(
                "signal {t} is a real-time signal: sockvisor signal sends the standard signals (1 to {}) only",
                libc::SIGSYS
            )),
            _ => Err(unknown()),
        }
    }
}

impl fmt::Display for WorkerSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        for s in ["SIGUSR1", "usr1", "sigusr1", "10", " USR1 "] {
            assert_eq!(
                WorkerSignal::parse(s).unwrap().number(),
                libc::SIGUSR1,
                "{s}"
            );
        }
        assert_eq!(WorkerSignal::parse("SIGHUP").unwrap().name(), "SIGHUP");
        assert_eq!(WorkerSignal::parse("15").unwrap().name(), "SIGTERM");
        assert_eq!(WorkerSignal::parse("winch").unwrap().name(), "SIGWINCH");
        assert_eq!(WorkerSignal::parse("iot").unwrap().name(), "SIGABRT");
        // Every standard signal but the two refused ones, by number.
        let ok = (1..=libc::SIGSYS)
            .filter(|&n| WorkerSignal::parse(&n.to_string()).is_ok())
            .count();
        assert_eq!(ok, libc::SIGSYS as usize - 2);
    }

    #[test]
    fn refusals_say_why() {
        for (s, why) in [
            ("SIGKILL", "SIGKILL is refused"),
            ("9", "SIGKILL is refused"),
            ("stop", "SIGSTOP is refused"),
            ("0", "not a signal"),
            ("34", "real-time signal"),
            ("SIGRTMIN+2", "real-time signal"),
            ("SIGFOO", "unknown signal \"SIGFOO\""),
            ("65", "unknown signal"),
            ("99999999999999999999", "unknown signal"),
            ("-1", "unknown signal"),
            ("", "unknown signal"),
        ] {
            let e = WorkerSignal::parse(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
