//! Prerequisites of tests that cannot run everywhere (root, a program, a python module): one
//! rule for every such test, integration tests (`tests/common`) and unit tests (`src/lib.rs`
//! includes this file) alike.
//!
//! `if !require(present, why) { return; }` at the top of the test. A missing prerequisite:
//! - by default, prints one line `SKIP: <test>: <why>` straight to stderr (not through the
//!   test harness's capture, so it shows in every run) and the test returns: it is counted as
//!   skipped, not passed, by scripts/test.sh, which counts these lines;
//! - with `SOCKVISOR_REQUIRE_ALL=1` ("every prerequisite is required"; CI sets it; the older
//!   `SOCKVISOR_SYSTEMD_TESTS=1` means the same), fails the test.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Set to 1: a missing prerequisite fails the test instead of skipping it.
pub const REQUIRE_ALL: &str = "SOCKVISOR_REQUIRE_ALL";
/// The variable's older name (it used to apply to tests/systemd_e2e.rs only).
pub const REQUIRE_ALL_ALIAS: &str = "SOCKVISOR_SYSTEMD_TESTS";

/// True when every prerequisite is required (`SOCKVISOR_REQUIRE_ALL=1`).
pub fn all_required() -> bool {
    [REQUIRE_ALL, REQUIRE_ALL_ALIAS]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| v == "1"))
}

/// `true`: the prerequisite is there, run the test. `false`: it is missing and the test must
/// return now (the `SKIP:` line is printed). Panics instead when every prerequisite is
/// required.
pub fn require(present: bool, why: &str) -> bool {
    if present {
        return true;
    }
    // libtest runs each test in a thread named after it.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("<unnamed test>");
    if all_required() {
        panic!(
            "{test}: missing prerequisite: {why} ({REQUIRE_ALL}=1: every prerequisite is required)"
        );
    }
    let line = format!("SKIP: {test}: {why} (with {REQUIRE_ALL}=1 this fails)\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    false
}

/// Running as root (the tests that switch users or own files for someone else need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `program` exists and runs `program --version` successfully (found on PATH or absolute).
pub fn have_program(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `python3` can `import module`.
pub fn python_imports(python: &str, module: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A file exists at `path`.
pub fn have_file(path: &str) -> bool {
    Path::new(path).exists()
}
