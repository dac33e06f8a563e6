//! Value parsers, shared by the file, the environment and the command line: a key's
//! [`Kind`] picks one, and every error says what was wrong and how to fix it.

use super::keys::Kind;
use super::layers::{Origin, RawListener};
use super::{DispatchPolicy, ListenAddr, ReadyMode};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A parsed value of some key; its variant follows from the key's [`Kind`].
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Count(usize),
    OptCount(Option<usize>),
    Duration(Duration),
    OptDuration(Option<Duration>),
    OptBytes(Option<u64>),
    OptTcp(Option<SocketAddr>),
    Text(String),
    Path(PathBuf),
    Policy(DispatchPolicy),
    Ready(ReadyMode),
    ExitCodes(Vec<i32>),
    Command(Vec<String>),
    Listeners(Vec<RawListener>),
    Switch(bool),
}

/// The Rust type `resolve` reads a key's value as.
pub(crate) trait FromValue: Sized {
    fn from_value(v: Value) -> Option<Self>;
}

macro_rules! from_value {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl FromValue for $t {
            fn from_value(v: Value) -> Option<Self> {
                match v {
                    Value::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    )*};
}

from_value!(
    usize => Count,
    Option<usize> => OptCount,
    Duration => Duration,
    Option<Duration> => OptDuration,
    Option<u64> => OptBytes,
    Option<SocketAddr> => OptTcp,
    String => Text,
    PathBuf => Path,
    DispatchPolicy => Policy,
    ReadyMode => Ready,
    Vec<i32> => ExitCodes,
    Vec<String> => Command,
    Vec<RawListener> => Listeners,
    bool => Switch,
);

impl FromValue for u32 {
    fn from_value(v: Value) -> Option<Self> {
        usize::from_value(v).and_then(|n| u32::try_from(n).ok())
    }
}

/// A value error: what was wrong, and how to fix it (empty when the message says it).
pub(crate) type VErr = (String, String);

pub(crate) fn got(s: &str) -> String {
    format!("{s:?}")
}

/// Parse `s` as a value of `kind`. `at` is kept by listeners, which carry their origin.
pub(crate) fn parse(kind: Kind, s: &str, at: &Origin) -> Result<Value, VErr> {
    Ok(match kind {
        Kind::Count { min, max } => Value::Count(parse_count(s, min, max)?),
        Kind::CountOrAll => Value::OptCount(match s.trim() {
            "all" => None,
            _ => Some(
                parse_count(s, 1, usize::MAX)
                    .map_err(|(m, _)| (m, "use a number of workers, or \"all\"".into()))?,
            ),
        }),
        Kind::CountOrAuto => Value::OptCount(match s.trim() {
            "auto" => None,
            _ => Some(
                parse_count(s, 1, usize::MAX)
                    .map_err(|(m, _)| (m, "use a number of workers, or \"auto\"".into()))?,
            ),
        }),
        Kind::OptBytes => Value::OptBytes(match s.trim() {
            "none" | "off" | "0" => None,
            _ => Some(parse_bytes(s)?),
        }),
        Kind::OptTcp => Value::OptTcp(match s.trim() {
            "off" | "none" => None,
            t => Some(parse_tcp_address(t)?),
        }),
        Kind::Duration => Value::Duration(parse_dur(s)?),
        Kind::OptDuration => Value::OptDuration(match s.trim() {
            "none" | "off" | "0" => None,
            _ => Some(parse_dur(s)?).filter(|d| !d.is_zero()),
        }),
        Kind::Text => Value::Text(parse_nonempty(s)?),
        Kind::Path => Value::Path(parse_nonempty(s).map(PathBuf::from)?),
        Kind::Policy => Value::Policy(parse_policy(s)?),
        Kind::Ready => Value::Ready(parse_ready(s)?),
        Kind::Choice(words) => match words.iter().find(|w| **w == s.trim()) {
            Some(w) => Value::Text(w.to_string()),
            None => {
                return Err((
                    format!("unknown value {}", got(s)),
                    format!("use {}", words.join(" or ")),
                ))
            }
        },
        Kind::OptPercent => Value::OptCount(match s.trim() {
            "none" => None,
            t => Some(parse_permille(t)?),
        }),
        Kind::Switch => Value::Switch(match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => true,
            "false" | "no" | "off" | "0" => false,
            _ => {
                return Err((
                    format!("expected true or false, got {}", got(s)),
                    "use true or false (also yes/no, on/off, 1/0)".into(),
                ))
            }
        }),
        Kind::ExitCodes => Value::ExitCodes(
            s.split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(parse_exit_code)
                .collect::<Result<_, _>>()?,
        ),
        Kind::Command => Value::Command(split_command(s)?),
        Kind::Listen => {
            let mut list = Vec::new();
            for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let (name, addr) = parse_listen(item).map_err(|m| (m, LISTEN_FORMS.into()))?;
                list.push(RawListener::new(name, Some(addr), at.clone()));
            }
            Value::Listeners(list)
        }
    })
}

/// `10%`, `10`, `12.5%` in tenths of a percent (per mille): 0..=1000.
fn parse_permille(s: &str) -> Result<usize, VErr> {
    let bad = || {
        (
            format!("expected a percentage, got {}", got(s)),
            "use a number from 0 to 100 with an optional % and at most one decimal, e.g. 10% or 12.5%, or none".to_string(),
        )
    };
    let t = s.trim().trim_end_matches('%').trim();
    let (whole, tenth) = match t.split_once('.') {
        Some((w, f)) if f.len() == 1 => (w, f),
        Some(_) => return Err(bad()),
        None => (t, "0"),
    };
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !tenth.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let n = whole.parse::<usize>().map_err(|_| bad())? * 10
        + tenth.parse::<usize>().map_err(|_| bad())?;
    if n > 1000 {
        return Err(bad());
    }
    Ok(n)
}

pub(crate) fn parse_count(s: &str, min: usize, max: usize) -> Result<usize, VErr> {
    let what = if min >= 1 {
        "a positive integer"
    } else {
        "a non-negative integer"
    };
    match s.trim().parse::<usize>() {
        Ok(n) if n > max => Err((
            format!("{} is too large", got(s)),
            format!("use at most {max}"),
        )),
        Ok(n) if n >= min => Ok(n),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Err((
            format!("{} is too large", got(s)),
            format!("use at most {max}"),
        )),
        _ => Err((
            format!("expected {what}, got {}", got(s)),
            format!("use a whole number >= {min}"),
        )),
    }
}

/// A TCP address to listen on: `tcp://HOST:PORT`, or the bare forms `--listen` takes
/// (`:9100`, `9100`: all addresses).
pub(crate) fn parse_tcp_address(s: &str) -> Result<SocketAddr, VErr> {
    let fix = "use tcp://HOST:PORT (e.g. tcp://127.0.0.1:9100), :PORT or off";
    match parse_listen(s) {
        Ok((None, ListenAddr::Tcp(a))) => Ok(a),
        Ok(_) => Err((format!("{} is not a TCP address", got(s)), fix.into())),
        Err(m) => Err((m, fix.into())),
    }
}

/// Parse a size: a whole number of bytes, or with a suffix `K`, `M`, `G`, `T` (powers of
/// 1024, as systemd's `MemoryMax=`; `KiB`, `MiB`, ... and `KB`, `MB`, ... mean the same).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, VErr> {
    let t = s.trim();
    let bad = || {
        (
            format!("expected a size, got {}", got(s)),
            "use e.g. \"512M\", \"1G\", \"65536\" (bytes), or \"none\"".to_string(),
        )
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "k" | "KB" | "KiB" => 10,
        "M" | "MB" | "MiB" => 20,
        "G" | "GB" | "GiB" => 30,
        "T" | "TB" | "TiB" => 40,
        _ => return Err(bad()),
    };
    match n.checked_mul(1u64 << shift) {
        Some(0) => Err(("a size of 0".into(), "use none for no limit".into())),
        Some(v) => Ok(v),
        None => Err((format!("{} is too large", got(s)), String::new())),
    }
}

/// Parse a systemd-style duration: `500ms`, `10s`, `2min`, `2m`, `1h`, `1.5s`, `1min 30s`, or
/// a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "expected a duration, got {} (use e.g. \"500ms\", \"10s\", \"1.5s\", \"2min\", \"1h\" or a number of seconds)",
            got(s)
        )
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let b = t.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i == b.len() {
            break;
        }
        let num_start = i;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let num = &t[num_start..i];
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        let unit_start = i;
        while i < b.len() && b[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &t[unit_start..i];
        let unit_ns: u128 = match unit {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
            "us" | "usec" | "µs" => 1_000,
            "ms" | "msec" => 1_000_000,
            "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
            "h" | "hr" | "hour" | "hours" => 3_600_000_000_000,
            "d" | "day" | "days" => 86_400_000_000_000,
            _ => return Err(bad()),
        };
        let (int, frac) = match num.split_once('.') {
            Some((a, f)) => (a, f),
            None => (num, ""),
        };
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') || frac.len() > 18 {
            return Err(bad());
        }
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let mut part = int.checked_mul(unit_ns).ok_or_else(bad)?;
        if !frac.is_empty() {
            let f: u128 = frac.parse().map_err(|_| bad())?;
            part += f * unit_ns / 10u128.pow(frac.len() as u32);
        }
        total = total.checked_add(part).ok_or_else(bad)?;
        // A bare number is only allowed alone.
        if unit.is_empty() && (num_start != 0 || i != b.len()) {
            return Err(bad());
        }
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| bad())?;
    if secs > MAX_DURATION_SECS {
        return Err(format!("duration {} is too long (at most 365d)", got(s)));
    }
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Durations are deadlines added to the monotonic clock: a year is long enough for any of
/// them and far from overflowing `Instant`.
const MAX_DURATION_SECS: u64 = 365 * 86_400;

fn parse_dur(s: &str) -> Result<Duration, VErr> {
    // parse_duration's message already says how to write one.
    parse_duration(s).map_err(|m| (m, String::new()))
}

pub(crate) fn parse_policy(s: &str) -> Result<DispatchPolicy, VErr> {
    match s.trim() {
        "auto" => Ok(DispatchPolicy::Auto),
        "reuseport" => Ok(DispatchPolicy::Reuseport),
        "round-robin" | "round_robin" | "rr" => Ok(DispatchPolicy::RoundRobin),
        "shared" => Ok(DispatchPolicy::Shared),
        "ip-hash" | "ip_hash" => Ok(DispatchPolicy::IpHash),
        "least-connections" | "least_connections" => Ok(DispatchPolicy::LeastConnections),
        _ => Err((
            format!("unknown dispatch policy {}", got(s)),
            "use auto, reuseport or shared (any program), or round-robin, ip-hash or least-connections (workers that speak the channel protocol)".into(),
        )),
    }
}

fn parse_ready(s: &str) -> Result<ReadyMode, VErr> {
    match s.trim() {
        "exec" => Ok(ReadyMode::Exec),
        "notify" => Ok(ReadyMode::Notify),
        _ => Err((
            format!("expected \"exec\" or \"notify\", got {}", got(s)),
            "use exec (ready when started) or notify (ready at the worker's READY=1)".into(),
        )),
    }
}

pub(crate) fn parse_exit_code(s: &str) -> Result<i32, VErr> {
    match s.trim().parse::<i32>() {
        Ok(n) if (0..=255).contains(&n) => Ok(n),
        _ => Err((
            format!("expected an exit code 0-255, got {}", got(s)),
            "list exit codes like [2, 78]".into(),
        )),
    }
}

fn parse_nonempty(s: &str) -> Result<String, VErr> {
    if s.trim().is_empty() {
        Err((
            "must not be empty".into(),
            "give a value or remove it".into(),
        ))
    } else {
        Ok(s.trim().to_string())
    }
}

fn split_command(s: &str) -> Result<Vec<String>, VErr> {
    let v: Vec<String> = s.split_whitespace().map(String::from).collect();
    if v.is_empty() {
        Err((
            "the command is empty".into(),
            "give the program to run and its arguments".into(),
        ))
    } else {
        Ok(v)
    }
}

// ---------------------------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------------------------

/// The fix of every bad listen address.
pub(crate) const LISTEN_FORMS: &str = "accepted forms: [NAME=]URL with URL tcp://HOST:PORT, udp://HOST:PORT, unix:/ABSOLUTE/PATH, or PORT or :PORT for TCP on all addresses; a NAME alone is a socket systemd passes; e.g. web=tcp://127.0.0.1:8000, tcp://[::1]:8000, dns=udp://0.0.0.0:53, unix:/run/app.sock, 8000";

/// Check a listener name: it becomes a `LISTEN_FDNAMES` entry and must match a systemd
/// `FileDescriptorName=`: 1-255 printable ASCII characters, no `:`.
pub fn check_listener_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!(
            "listener name {} must be 1-255 characters",
            got(name)
        ));
    }
    if !name.bytes().all(|c| c.is_ascii_graphic() && c != b':') {
        return Err(format!(
            "listener name {} may only contain printable ASCII characters other than ':' (it is a FileDescriptorName=)",
            got(name)
        ));
    }
    Ok(())
}

fn parse_host_port(rest: &str, spec: &str) -> Result<SocketAddr, String> {
    let bad = |why: &str| format!("bad listen address {}: {why}", got(spec));
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r
            .split_once(']')
            .ok_or_else(|| bad("missing ']' after an IPv6 address"))?;
        let p = p
            .strip_prefix(':')
            .ok_or_else(|| bad("missing :PORT after the address"))?;
        let ip: Ipv6Addr = h
            .parse()
            .map_err(|_| bad("not an IPv6 address between [ ]"))?;
        (IpAddr::V6(ip), p)
    } else {
        let (h, p) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("missing :PORT; give a port, 0 for any"))?;
        let ip = match h {
            "" | "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            _ if h.contains(':') => {
                return Err(bad("write an IPv6 address in brackets, like [::1]:8000"))
            }
            _ => h.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| {
                bad("the host must be an IP address, \"localhost\" or empty for all interfaces")
            })?,
        };
        (ip, p)
    };
    if port.is_empty() {
        return Err(bad("missing port after ':'"));
    }
    Ok(SocketAddr::new(host, parse_port(port).map_err(bad)?))
}

fn parse_port(port: &str) -> Result<u16, &'static str> {
    port.parse()
        .map_err(|_| "the port must be a number 0-65535")
}

/// The address a bare `PORT` (or `:PORT`) listens on. As systemd's `ListenStream=PORT`: the
/// IPv6 wildcard, which (with the default `net.ipv6.bindv6only=0`) takes IPv4 too; the IPv4
/// wildcard on a host without IPv6 (systemd's `socket_ipv6_is_supported` test).
pub(crate) fn all_addresses() -> IpAddr {
    if Path::new("/proc/net/if_inet6").exists() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// Parse a `[NAME=]URL` listener spec: `tcp://HOST:PORT`, `udp://HOST:PORT`, `unix:PATH`
/// (`unix:///run/x.sock` is accepted too), or `PORT`/`:PORT` (TCP on all addresses: `[::]`, or `0.0.0.0` without IPv6).
/// HOST is an IPv4 address, `[IPv6]`, `localhost`, or empty/`*` for all IPv4 interfaces.
/// Port 0 is allowed (the kernel picks one). A unix path must be absolute and fit in
/// `sun_path` (107 bytes).
pub fn parse_listen(spec: &str) -> Result<(Option<String>, ListenAddr), String> {
    let spec = spec.trim();
    let (name, url) = match spec.split_once('=') {
        Some((n, u)) if !n.contains(':') && !n.contains('/') => (Some(n.to_string()), u),
        _ => (None, spec),
    };
    if let Some(n) = &name {
        check_listener_name(n)?;
    }
    let addr = parse_listen_url(url)?;
    Ok((name, addr))
}

/// `PORT` or `:PORT` (digits), the shorthand for TCP on all addresses.
fn is_port(url: &str) -> bool {
    let port = url.trim().strip_prefix(':').unwrap_or(url.trim());
    !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
}

/// `[NAME=]PORT` or `[NAME=]:PORT`: a spec that can only mean a port, never a bare name.
pub(crate) fn is_port_spec(spec: &str) -> bool {
    is_port(spec.split_once('=').map_or(spec, |(_, url)| url))
}

pub(crate) fn parse_listen_url(url: &str) -> Result<ListenAddr, String> {
    let url = url.trim();
    if is_port(url) {
        let port = url.strip_prefix(':').unwrap_or(url);
        let port = parse_port(port).map_err(|m| format!("bad listen address {}: {m}", got(url)))?;
        return Ok(ListenAddr::Tcp(SocketAddr::new(all_addresses(), port)));
    }
    if let Some(rest) = url.strip_prefix("tcp://") {
        return parse_host_port(rest, url).map(ListenAddr::Tcp);
    }
    if let Some(rest) = url.strip_prefix("udp://") {
        return parse_host_port(rest, url).map(ListenAddr::Udp);
    }
    if let Some(rest) = url.strip_prefix("unix:") {
        let path = match rest.strip_prefix("//") {
            Some(p) if p.starts_with('/') => p,
            _ => rest,
        };
        if path.starts_with('@') {
            return Err(format!(
                "bad listen address {}: abstract unix sockets are not supported; use a path",
                got(url)
            ));
        }
        if !path.starts_with('/') {
            return Err(format!(
                "bad listen address {}: the unix socket path must be absolute, like unix:/run/app.sock",
                got(url)
            ));
        }
        if path.len() > 107 || path.contains('\0') {
            return Err(format!(
                "bad listen address {}: a unix socket path must be at most 107 bytes",
                got(url)
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    let why = match url.split_once("://") {
        Some((scheme, _)) => format!("unknown scheme {}", got(scheme)),
        None => "no scheme".to_string(),
    };
    Err(format!("bad listen address {}: {why}", got(url)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_capped_at_a_year() {
        assert_eq!(
            parse_duration("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        let e = parse_duration("4000000000000000h").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(parse_duration("366d").is_err());
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(d("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(d("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(d("7"), Ok(Duration::from_secs(7)));
        assert_eq!(d("1min 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(d(" 250 us "), Ok(Duration::from_micros(250)));
        for bad in [
            "",
            "s",
            "-1s",
            "1x",
            "1.2.3s",
            "1 2",
            "ms5",
            "99999999999999999999999999999h",
            "µ",
        ] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_urls() {
        let tcp = |s: &str| ListenAddr::Tcp(s.parse().unwrap());
        assert_eq!(
            parse_listen("tcp://127.0.0.1:8000"),
            Ok((None, tcp("127.0.0.1:8000")))
        );
        assert_eq!(
            parse_listen("web=tcp://[::1]:80"),
            Ok((Some("web".into()), tcp("[::1]:80")))
        );
        assert_eq!(
            parse_listen("tcp://127.0.0.1:0"),
            Ok((None, tcp("127.0.0.1:0")))
        );
        assert_eq!(parse_listen("tcp://:80"), Ok((None, tcp("0.0.0.0:80"))));
        assert_eq!(
            parse_listen("tcp://localhost:80"),
            Ok((None, tcp("127.0.0.1:80")))
        );
        assert_eq!(
            parse_listen("dns=udp://0.0.0.0:53"),
            Ok((
                Some("dns".into()),
                ListenAddr::Udp("0.0.0.0:53".parse().unwrap())
            ))
        );
        assert_eq!(
            parse_listen("unix:/run/a.sock"),
            Ok((None, ListenAddr::Unix("/run/a.sock".into())))
        );
        assert_eq!(
            parse_listen("unix:///run/a.sock"),
            Ok((None, ListenAddr::Unix("/run/a.sock".into())))
        );
        let e = parse_listen("http://127.0.0.1:80").unwrap_err();
        assert!(e.contains("unknown scheme \"http\""), "{e}");
        let e = parse_listen("tcp://127.0.0.1").unwrap_err();
        assert!(e.contains("missing :PORT"), "{e}");
        let e = parse_listen("tcp://127.0.0.1:").unwrap_err();
        assert!(e.contains("missing port"), "{e}");
        let e = parse_listen("tcp://::1:80").unwrap_err();
        assert!(e.contains("brackets"), "{e}");
        let e = parse_listen("tcp://1.2.3.4:70000").unwrap_err();
        assert!(e.contains("0-65535"), "{e}");
        let e = parse_listen("unix:run/a.sock").unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = parse_listen("a:b=tcp://1.2.3.4:1").unwrap_err();
        assert!(e.contains("bad listen address"), "{e}");
        assert!(parse_listen("=tcp://1.2.3.4:1").is_err());
        assert!(parse_listen("127.0.0.1:80").is_err());
    }

    /// Issue 14 item 20: `8000`, `:8000`, `web=8000`, `web=:8000` are TCP port 8000 on all
    /// addresses, the IPv6 wildcard (dual-stack) as systemd's `ListenStream=8000`.
    #[test]
    fn a_bare_port_is_tcp_on_all_addresses() {
        let all = |port| ListenAddr::Tcp(SocketAddr::new(all_addresses(), port));
        assert_eq!(parse_listen("8000"), Ok((None, all(8000))));
        assert_eq!(parse_listen(":8000"), Ok((None, all(8000))));
        assert_eq!(
            parse_listen("web=8000"),
            Ok((Some("web".into()), all(8000)))
        );
        assert_eq!(
            parse_listen("web=:8000"),
            Ok((Some("web".into()), all(8000)))
        );
        assert_eq!(parse_listen(" 0 "), Ok((None, all(0))));
        if Path::new("/proc/net/if_inet6").exists() {
            assert_eq!(all(80).to_string(), "tcp://[::]:80");
        }
        let e = parse_listen("70000").unwrap_err();
        assert!(e.contains("\"70000\"") && e.contains("0-65535"), "{e}");
        for bad in [":", "web=:", "8000x", ":-1", "1 2"] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tcp_addresses() {
        assert_eq!(
            parse_tcp_address("tcp://127.0.0.1:9100")
                .unwrap()
                .to_string(),
            "127.0.0.1:9100"
        );
        assert_eq!(parse_tcp_address(":9100").unwrap().port(), 9100);
        for bad in ["udp://127.0.0.1:1", "unix:/x", "m=tcp://127.0.0.1:1", "x"] {
            assert!(parse_tcp_address(bad).is_err(), "{bad:?}");
        }
        let at = Origin::Cli("t".into());
        assert!(matches!(
            parse(Kind::OptTcp, "off", &at),
            Ok(Value::OptTcp(None))
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes(" 1G "), Ok(1 << 30));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        for bad in ["", "M", "1.5G", "12X", "-1", "0"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
        assert!(parse_bytes("99999999999T")
            .unwrap_err()
            .0
            .contains("too large"));
        let at = Origin::Cli("t".into());
        assert!(matches!(
            parse(Kind::OptBytes, "none", &at),
            Ok(Value::OptBytes(None))
        ));
        assert!(matches!(
            parse(Kind::CountOrAuto, "auto", &at),
            Ok(Value::OptCount(None))
        ));
        assert!(matches!(
            parse(Kind::CountOrAuto, "3", &at),
            Ok(Value::OptCount(Some(3)))
        ));
        assert!(parse(Kind::CountOrAuto, "al", &at)
            .unwrap_err()
            .1
            .contains("auto"));
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count(" 3 ", 1, 10), Ok(3));
        assert!(parse_count("0", 1, 10).unwrap_err().0.contains("positive"));
        assert!(parse_count("11", 1, 10)
            .unwrap_err()
            .1
            .contains("at most 10"));
        let e = parse_count("99999999999999999999999", 1, usize::MAX).unwrap_err();
        assert!(e.0.contains("too large"), "{e:?}");
    }
}
