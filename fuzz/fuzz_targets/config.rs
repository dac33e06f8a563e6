//! `config::load_str`: the whole configuration path (command line, `SOCKVISOR_*`
//! environment, TOML file) on arbitrary input. The input is split on NUL bytes into
//! `TOML \0 ARGS \0 ENV`: ARGS one argument per line (after `-c fuzz.toml`), ENV one
//! `KEY=VALUE` per line. load never panics; every error names something and renders.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sockvisor::config::{load_str, Sources};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let toml = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let args = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let env = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let mut argv: Vec<std::ffi::OsString> = vec!["-c".into(), "/nonexistent/fuzz.toml".into()];
    argv.extend(args.lines().map(Into::into));
    let env = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sources = Sources { args: argv, env };
    match load_str(&sources, &toml) {
        Ok(_) => {}
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
        }
    }
});
