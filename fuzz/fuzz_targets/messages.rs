//! What sockvisor reads from workers' message sockets (`messages = true`): `wire::decode` on
//! any bytes, and the router fed arbitrary packets by a hostile worker (slot 0) over a real
//! SOCK_SEQPACKET pair. It must never panic, and count every packet exactly once: as sent
//! (then delivered, queued, dropped, undeliverable or for the operator) or as malformed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sockvisor::dispatch::WorkerRef;
use sockvisor::messages::wire::{self, Address};
use sockvisor::messages::Router;
use sockvisor::poller::Poller;
use nix::unistd::Pid;
use std::os::fd::{AsRawFd, OwnedFd};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = wire::decode(data) {
        // The same bytes back, but flags and reserved (ignored by readers).
        let back = wire::encode(m.from, m.to, m.payload).unwrap();
        assert_eq!((&back[..2], &back[4..]), (&data[..2], &data[4..]));
    }
    let poller = Poller::new().unwrap();
    let mut router = Router::default();
    let mut ends: Vec<OwnedFd> = Vec::new();
    let pids = [Pid::from_raw(1000), Pid::from_raw(1001)];
    for (slot, &pid) in pids.iter().enumerate() {
        router.stage().unwrap();
        ends.push(router.staged_fd().unwrap().try_clone_to_owned().unwrap());
        router.commit(WorkerRef { pid, slot, generation: 1, weight: 1 }, &poller);
    }
    let current = [Some(pids[0]), Some(pids[1])];
    // The input as packets: a length byte, then that many bytes (a short tail as it is).
    let (mut valid, mut invalid, mut for_slot1, mut for_operator, mut elsewhere) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut operator = 0u64;
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (packet, tail) = tail.split_at((len as usize).min(tail.len()));
        rest = tail;
        match wire::decode(packet) {
            Ok(m) => {
                valid += 1;
                match m.to {
                    Address::Slot(1) | Address::All => for_slot1 += 1,
                    Address::Operator => for_operator += 1,
                    // Its own slot, or one without a worker.
                    Address::Slot(_) => elsewhere += 1,
                }
            }
            Err(_) => invalid += 1,
        }
        // SAFETY: send(2) on a socket this target owns, from a live buffer.
        let r = unsafe {
            libc::send(ends[0].as_raw_fd(), packet.as_ptr().cast(), packet.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        assert!(r >= 0 || packet.is_empty(), "send failed");
        operator += router.handle(pids[0], &poller, &current).len() as u64;
    }
    // Everything sent is read (at most 64 per call).
    for _ in 0..data.len() {
        operator += router.handle(pids[0], &poller, &current).len() as u64;
    }
    let t = router.totals();
    let sender = router.figures(pids[0]).unwrap();
    let receiver = router.figures(pids[1]).unwrap();
    assert_eq!(sender.sent, valid);
    assert_eq!(t.malformed, invalid, "empty packets are skipped and counted too");
    assert_eq!(operator, for_operator);
    assert_eq!(t.to_operator, for_operator);
    assert_eq!(receiver.received + receiver.queued + receiver.dropped, for_slot1);
    // A message to its own slot reaches the sender itself.
    assert_eq!(sender.received + sender.queued + sender.dropped + t.undeliverable, elsewhere);
});
