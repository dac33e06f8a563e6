//! Logging to stderr. Under systemd (`JOURNAL_STREAM` names our stderr) each line starts with
//! a `<N>` syslog priority, which journald turns into the entry's priority; elsewhere lines
//! read `sockvisor: LEVEL message`. The level comes from `SOCKVISOR_LOG` (or `RUST_LOG`),
//! default `info`.

use log::Level;
use std::io::Write;
use std::os::fd::AsRawFd;

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// True when stderr is the journal stream systemd set up (`JOURNAL_STREAM=dev:inode`).
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let stderr = std::io::stderr();
    let Ok(st) = nix::sys::stat::fstat(&stderr) else {
        return false;
    };
    let _ = stderr.as_raw_fd();
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Install the logger. Safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = std::env::var("SOCKVISOR_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let journal = stderr_is_journal();
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&filter);
    builder.format(move |buf, record| {
        writeln!(buf, "{}", line(journal, record.level(), record.args()))
    });
    let _ = builder.try_init();
}

/// One log line, without its newline.
fn line(journal: bool, level: Level, message: &dyn std::fmt::Display) -> String {
    if journal {
        format!("<{}>{message}", priority(level))
    } else {
        format!(
            "sockvisor: {:<5} {message}",
            level.as_str().to_ascii_lowercase()
        )
    }
}

/// Print the error sockvisor exits on (a configuration or usage error) as an error line like
/// every other, whatever the log level: `sockvisor: error MESSAGE`, or `<3>MESSAGE` to the
/// journal.
pub fn fatal(message: &dyn std::fmt::Display) {
    eprintln!("{}", line(stderr_is_journal(), Level::Error, message));
}

/// A message that may repeat for every connection or datagram, logged at most once per
/// interval with how many times it happened meanwhile.
#[derive(Debug)]
pub struct Throttle {
    interval: std::time::Duration,
    logged_at: Option<std::time::Instant>,
    /// Occurrences so far.
    pub count: u64,
}

impl Throttle {
    pub const fn new(interval: std::time::Duration) -> Throttle {
        Throttle {
            interval,
            logged_at: None,
            count: 0,
        }
    }

    /// Count one occurrence; true when it should be logged now.
    pub fn hit(&mut self, now: std::time::Instant) -> bool {
        self.count += 1;
        if self.logged_at.is_some_and(|t| now < t + self.interval) {
            return false;
        }
        self.logged_at = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;
    use std::time::{Duration, Instant};

    #[test]
    fn throttle_logs_once_per_interval_and_counts_all() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(t.hit(t0));
        for i in 1..1000 {
            assert!(!t.hit(t0 + Duration::from_millis(i)));
        }
        assert!(t.hit(t0 + Duration::from_secs(10)));
        assert_eq!(t.count, 1001);
    }
}
