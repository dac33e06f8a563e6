//! [`SteeredGroup`]: one `SO_REUSEPORT` group (one listening address and protocol) steered
//! by our program: its maps, the loaded program, and the operations the supervisor needs.
//!
//! Ownership: the group owns the map and program fds; it does not own any socket. The kernel
//! keeps the program (and through it the maps) alive as long as it is attached to a group
//! that still has a member, so the steering outlives this value and even its process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use super::bpf::{self, AttachType, BpfError, Map, MapKind, Program};
use super::listener;
use super::program::{
    self, MapFds, ANCHOR_KEY, HEADER_HALF_BIT, HEADER_LEN_MASK, SCHEDULE_CAPACITY,
};
use super::schedule;

/// The most worker listeners one group can hold (keys `1..=MAX_CAPACITY`).
pub const MAX_CAPACITY: u32 = 4096;
/// The most probe routes in place at once.
const MAX_PROBES: u32 = 64;

/// A member of the group, as the program knows it: 0 is the anchor, `1..=capacity` are
/// worker listeners (the supervisor allocates them, e.g. one per worker incarnation, so a
/// reload's old and new generations can coexist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(u32);

impl Key {
    pub const ANCHOR: Key = Key(ANCHOR_KEY);

    /// A worker listener's key; `None` for 0 (the anchor's).
    pub fn worker(n: u32) -> Option<Key> {
        (n != ANCHOR_KEY).then_some(Key(n))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// What the program counted for one member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// New connections (or datagrams) it selected this member for.
    pub dispatched: u64,
    /// Connections migrating off a closed or requeued listener it moved to this member.
    pub migrated: u64,
}

/// A reuseport group steered by our program.
#[derive(Debug)]
pub struct SteeredGroup {
    sockets: Map,
    schedule: Map,
    control: Map,
    cursor: Map,
    counters: Map,
    probes: Map,
    program: Program,
    capacity: u32,
    /// The schedule half the program reads now; the next update writes the other one.
    active_half: u32,
    /// Length of the active schedule (0: nobody ready, connections wait on the anchor).
    schedule_len: u32,
}

impl SteeredGroup {
    /// Create the maps and load the program for up to `capacity` worker listeners. Needs
    /// `CAP_BPF` or `CAP_SYS_ADMIN` ([`BpfError::is_permission`] says when that is why it
    /// failed). Nothing is attached yet: see [`SteeredGroup::attach`].
    pub fn new(capacity: u32, attach: AttachType) -> Result<SteeredGroup, BpfError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(BpfError {
                op: "group capacity (1..=4096)",
                errno: libc::EINVAL,
                verifier_log: None,
            });
        }
        let u32s = std::mem::size_of::<u32>() as u32;
        let members = capacity + 1; // the anchor and the workers
        let sockets = Map::create(MapKind::ReuseportSockarray, u32s, 8, members, "sv_sockets")?;
        let schedule = Map::create(
            MapKind::Array,
            u32s,
            u32s,
            2 * SCHEDULE_CAPACITY,
            "sv_schedule",
        )?;
        let control = Map::create(MapKind::Array, u32s, u32s, 1, "sv_control")?;
        let cursor = Map::create(MapKind::Array, u32s, 8, 1, "sv_cursor")?;
        // One more entry than members: connections the program could place nowhere.
        let counters = Map::create(MapKind::Array, u32s, 16, members + 1, "sv_counters")?;
        let probes = Map::create(MapKind::Hash, u32s, u32s, MAX_PROBES, "sv_probes")?;
        let insns = program::instructions(&MapFds {
            sockets: sockets.raw_fd(),
            schedule: schedule.raw_fd(),
            control: control.raw_fd(),
            cursor: cursor.raw_fd(),
            counters: counters.raw_fd(),
            probes: probes.raw_fd(),
            capacity,
        });
        let program = Program::load_sk_reuseport(&insns, attach, "sv_reuseport")?;
        Ok(SteeredGroup {
            sockets,
            schedule,
            control,
            cursor,
            counters,
            probes,
            program,
            capacity,
            active_half: 0,
            schedule_len: 0,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Attach the program to the group `member` belongs to (any listening member: the anchor
    /// or a worker listener, whoever created it), replacing whatever program was attached
    /// (a previous sockvisor's included). From now on it chooses for the whole group.
    pub fn attach(&self, member: BorrowedFd<'_>) -> io::Result<()> {
        bpf::attach_reuseport_program(member, &self.program)
    }

    fn check_key(&self, key: Key) -> Result<(), BpfError> {
        if key.0 > self.capacity {
            return Err(BpfError {
                op: "member key beyond the group's capacity",
                errno: libc::E2BIG,
                verifier_log: None,
            });
        }
        Ok(())
    }

    /// Put a listener in the sockarray at `key` (replacing the socket there). It must be
    /// listening in this group (`EINVAL` otherwise) and in no other sockarray slot (`EBUSY`).
    /// A listener in the sockarray but not in the schedule receives nothing except probes.
    pub fn insert(&self, key: Key, listener: BorrowedFd<'_>) -> Result<(), BpfError> {
        self.check_key(key)?;
        let fd = listener.as_raw_fd() as u64;
        self.sockets.update(&key.0.to_ne_bytes(), &fd.to_ne_bytes())
    }

    /// Take `key` out of the sockarray; `false` if it was empty (the kernel empties a slot
    /// itself when its listener closes or is shut down).
    pub fn remove(&self, key: Key) -> Result<bool, BpfError> {
        self.check_key(key)?;
        self.sockets.delete(&key.0.to_ne_bytes())
    }

    /// The socket cookie of the listener at `key` (`SO_COOKIE`, for sock_diag), or `None`
    /// if the slot is empty.
    pub fn cookie(&self, key: Key) -> Result<Option<u64>, BpfError> {
        self.check_key(key)?;
        let mut v = [0u8; 8];
        let found = self.sockets.lookup(&key.0.to_ne_bytes(), &mut v)?;
        Ok(found.then(|| u64::from_ne_bytes(v)))
    }

    /// Plain round robin over `ready`, in this order. Empty: new connections wait on the
    /// anchor.
    pub fn set_ready(&mut self, ready: &[Key]) -> Result<(), BpfError> {
        self.set_schedule(ready)
    }

    /// Smooth weighted round robin over `(member, weight)`.
    pub fn set_weighted(&mut self, weights: &[(Key, u32)]) -> Result<(), BpfError> {
        let raw: Vec<(u32, u32)> = weights.iter().map(|&(k, w)| (k.0, w)).collect();
        let cycle: Vec<Key> = schedule::smooth_weighted(&raw, SCHEDULE_CAPACITY as usize)
            .into_iter()
            .map(Key)
            .collect();
        self.set_schedule(&cycle)
    }

    /// The sequence the program walks (for TCP one turn per connection; for UDP the flow hash
    /// picks the position). At most `SCHEDULE_CAPACITY` entries; worker keys only.
    ///
    /// Order of writes: the entries go into the half the program does not read, then one
    /// update of the header makes it the active half. A connection sees the old schedule or
    /// the new one. The half written next time is the one just retired: a program run that
    /// read the old header an instant before the flip could still be reading it, and would see
    /// a valid member key either way.
    pub fn set_schedule(&mut self, entries: &[Key]) -> Result<(), BpfError> {
        if entries.len() > SCHEDULE_CAPACITY as usize {
            return Err(BpfError {
                op: "schedule longer than its capacity (1024)",
                errno: libc::E2BIG,
                verifier_log: None,
            });
        }
        if let Some(bad) = entries
            .iter()
            .find(|k| k.0 == ANCHOR_KEY || k.0 > self.capacity)
        {
            return Err(BpfError {
                op: if bad.0 == ANCHOR_KEY {
                    "the anchor in a schedule"
                } else {
                    "member key beyond the group's capacity"
                },
                errno: libc::EINVAL,
                verifier_log: None,
            });
        }
        let next_half = 1 - self.active_half;
        let base = next_half * SCHEDULE_CAPACITY;
        for (i, key) in entries.iter().enumerate() {
            let index = base + i as u32;
            self.schedule
                .update(&index.to_ne_bytes(), &key.0.to_ne_bytes())?;
        }
        let len = entries.len() as u32;
        let header = (next_half << HEADER_HALF_BIT) | (len & HEADER_LEN_MASK);
        self.control
            .update(&0u32.to_ne_bytes(), &header.to_ne_bytes())?;
        self.active_half = next_half;
        self.schedule_len = len;
        Ok(())
    }

    /// Members in the schedule now (0: nobody ready).
    pub fn schedule_len(&self) -> u32 {
        self.schedule_len
    }

    /// Route connections from client source port `port` to `key` only (a health probe bound
    /// to that port before connecting), ready or not. If that member has no listener the probe
    /// is refused rather than served by another worker.
    pub fn pin_probe(&self, port: u16, key: Key) -> Result<(), BpfError> {
        self.check_key(key)?;
        self.probes
            .update(&u32::from(port).to_ne_bytes(), &key.0.to_ne_bytes())
    }

    /// Remove a probe route; `false` if there was none.
    pub fn unpin_probe(&self, port: u16) -> Result<bool, BpfError> {
        self.probes.delete(&u32::from(port).to_ne_bytes())
    }

    /// The program's counts for `key`.
    pub fn counters(&self, key: Key) -> Result<Counters, BpfError> {
        self.check_key(key)?;
        self.read_counters(key.0)
    }

    /// Connections the program could place nowhere (no scheduled listener and no anchor in
    /// the sockarray): the kernel's hash chose for them.
    pub fn unselected(&self) -> Result<u64, BpfError> {
        Ok(self.read_counters(self.capacity + 1)?.dispatched)
    }

    fn read_counters(&self, index: u32) -> Result<Counters, BpfError> {
        let mut v = [0u8; 16];
        self.counters.lookup(&index.to_ne_bytes(), &mut v)?;
        let half = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[r]);
            u64::from_ne_bytes(b)
        };
        Ok(Counters {
            dispatched: half(0..8),
            migrated: half(8..16),
        })
    }

    /// The round-robin turn counter (connections that took a turn so far).
    pub fn turns(&self) -> Result<u64, BpfError> {
        let mut v = [0u8; 8];
        self.cursor.lookup(&0u32.to_ne_bytes(), &mut v)?;
        Ok(u64::from_ne_bytes(v))
    }

    /// Move the connections queued on the listener at `key` to the program's choice now,
    /// without closing the port, and put the listener back in the sockarray: see
    /// [`listener::requeue`]. For the anchor (connections that arrived while nobody was
    /// ready) this needs a non-empty schedule: the anchor leaves the sockarray while it is
    /// requeued, so with nobody ready its queue would have nowhere to go.
    pub fn requeue(&self, key: Key, listener: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
        self.check_key(key)?;
        if key == Key::ANCHOR && self.schedule_len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "no ready worker to take the anchor's queue",
            ));
        }
        listener::requeue(listener, backlog)?;
        self.insert(key, listener)?;
        Ok(())
    }

    /// The sockarray's fd, for test programs that select from it.
    #[cfg(test)]
    pub(crate) fn sockets_map_fd(&self) -> i32 {
        self.sockets.raw_fd()
    }

    /// The program, to attach elsewhere or keep alive independently of this value.
    pub fn program(&self) -> BorrowedFd<'_> {
        self.program.as_fd()
    }
}
