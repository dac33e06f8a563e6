//! What sockvisor reads from workers' channels: `protocol::Message::decode` on any bytes,
//! and `Channel::read_reports` on a real SOCK_SEQPACKET pair fed with arbitrary messages
//! (any length, empty ones included) by a hostile "worker". read_reports must never panic,
//! never report a hang-up that did not happen, and count exactly the valid `closed` reports.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sockvisor::dispatch::Channel;
use sockvisor::protocol::{Message, MSG_LEN};
use std::os::fd::AsRawFd;

thread_local! {
    static CHANNEL: Channel = Channel::new().expect("socketpair");
}

fuzz_target!(|data: &[u8]| {
    // decode on the whole input, and its round trip when it decodes.
    if let Ok(m) = Message::decode(data) {
        assert_eq!(data.len(), MSG_LEN);
        assert_eq!(Message::decode(&m.encode()), Ok(m));
    }
    // The input as a sequence of messages: a length byte (0..=15), then that many bytes.
    CHANNEL.with(|ch| {
        let mut rest = data;
        let mut expected = 0u64;
        let mut got = 0u64;
        let mut sent = 0;
        while let Some((&len, tail)) = rest.split_first() {
            let len = (len as usize % 16).min(tail.len());
            let (msg, tail) = tail.split_at(len);
            rest = tail;
            if let Ok(Message::Closed { count }) = Message::decode(msg) {
                expected += u64::from(count);
            }
            // The worker's end is blocking: send without waiting, drain when the queue is full.
            loop {
                // SAFETY: send(2) on a socket this target owns, from a live buffer.
                let r = unsafe {
                    libc::send(
                        ch.worker_end().as_raw_fd(),
                        msg.as_ptr().cast(),
                        msg.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if r >= 0 {
                    break;
                }
                let r = ch.read_reports();
                assert!(!r.hung_up, "hang-up reported while the worker's end is open");
                got += r.closed;
            }
            sent += 1;
            if sent % 8 == 0 {
                let r = ch.read_reports();
                assert!(!r.hung_up, "hang-up reported while the worker's end is open");
                got += r.closed;
            }
        }
        let r = ch.read_reports();
        assert!(!r.hung_up, "hang-up reported while the worker's end is open");
        got += r.closed;
        assert_eq!(got, expected, "closed reports miscounted");
    });
});
