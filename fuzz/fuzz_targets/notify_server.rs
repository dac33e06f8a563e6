//! `notify_server::parse`: every datagram a worker (any process that can reach the notify
//! socket) sends. Never panics; STATUS= stays within MAX_STATUS_LEN and free of control
//! characters; flags are set only by their exact systemd spelling.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sockvisor::notify_server::{parse, MAX_STATUS_LEN};

fuzz_target!(|data: &[u8]| {
    let n = parse(data);
    if let Some(s) = &n.status {
        assert!(s.len() <= MAX_STATUS_LEN, "STATUS= of {} bytes", s.len());
        assert!(!s.chars().any(char::is_control), "control char in {s:?}");
    }
    if n.ready {
        assert!(data.split(|&b| b == b'\n').any(|l| l == b"READY=1"));
    }
    if let Some(e) = n.errno {
        assert!(e >= 0);
    }
});
