//! `config::parse_listen`: `--listen [NAME=]URL`, `listen = [...]`, `SOCKVISOR_LISTEN`.
//! Never panics; an accepted spec names a valid listener, and its canonical form
//! parses back to the same address.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sockvisor::config::{check_listener_name, parse_listen};

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((name, addr)) = parse_listen(spec) {
        if let Some(name) = &name {
            assert!(
                check_listener_name(name).is_ok(),
                "accepted bad name {name:?}"
            );
        }
        let again = parse_listen(&addr.to_string())
            .unwrap_or_else(|e| panic!("{spec:?} -> {addr} does not parse back: {e}"));
        assert_eq!(again.1, addr, "{spec:?} round trip");
    }
});
