//! The `SK_REUSEPORT` program: which listener of the group gets a new connection, a datagram,
//! or a connection migrating off a closing listener.
//!
//! The maps it reads (created by [`super::group::SteeredGroup`]):
//!
//! | map | type | key → value | written by |
//! |---|---|---|---|
//! | `sockets` | REUSEPORT_SOCKARRAY | member key → listener | user space; the kernel clears an entry when its listener stops listening |
//! | `schedule` | ARRAY | position → member key, two halves of [`SCHEDULE_CAPACITY`] | user space, the half not in use |
//! | `control` | ARRAY, 1 entry | 0 → header: bit 31 the half in use, bits 0-30 its length | user space, one write flips the schedule |
//! | `cursor` | ARRAY, 1 entry | 0 → `u64` round-robin turn | the program (atomic fetch-add) |
//! | `counters` | ARRAY | member key → `{dispatched: u64, migrated: u64}` | the program (atomic add) |
//! | `probes` | HASH | client source port → member key | user space, around a health-check connection |
//!
//! Member key 0 is the anchor (the socket systemd passed, or the one sockvisor bound first);
//! keys `1..=capacity` are worker listeners; key `capacity + 1` of `counters` counts the
//! connections the program could place nowhere.
//!
//! The decision, in order:
//! 1. **Probe**: the client's source port is in `probes`: select that member and nothing else
//!    (health checks must reach the worker they test). If that member has no listener, or the
//!    probe is migrating off a closed one, `SK_DROP`: the probe fails, as it should.
//! 2. **Schedule**: the turn is the next `cursor` value (TCP) or the packet's flow hash (UDP,
//!    so one flow stays on one worker); try `schedule[base + (turn + i) % len]` for up to
//!    [`MAX_TRIES`] consecutive positions until one selects (an entry whose listener closed
//!    fails to select and is skipped).
//! 3. **Anchor**: the schedule is empty (nobody ready) or every try failed: select the anchor,
//!    where the connection waits until sockvisor requeues the anchor onto a ready worker.
//! 4. Nothing selectable at all (no anchor in the map): `SK_PASS` without a selection, which
//!    lets the kernel hash over the group's listeners; counted under key `capacity + 1`.
//!    A connection is never refused by this program except a failed probe.
//!
//! Why a double-buffered schedule: the program reads the header once, then only the half it
//! names; user space writes the other half and then flips the header with one map update. A
//! reader sees the old schedule or the new one, never a mix of lengths and entries. The header
//! is validated (length 1..=capacity) so even a torn write cannot index outside its half.
//!
//! Read with: `include/uapi/linux/bpf.h` (`struct sk_reuseport_md`, `struct bpf_sock`,
//! `bpf_sk_select_reuseport`), `net/core/filter.c` (`sk_select_reuseport`,
//! `bpf_run_sk_reuseport`), `net/core/sock_reuseport.c` (`reuseport_select_sock`,
//! `reuseport_migrate_sock`).

use super::insn::{
    add64_imm, add64_reg, and64_imm, atomic_add64, atomic_fetch_add64, be16, call, exit, load,
    load_map, lsh64_imm, mod64_reg, mov64_imm, mov64_reg, rsh64_imm, store_imm, store_reg, Asm,
    Cond, Insn, Reg, Size,
};
use Reg::*;

/// Entries in each half of the schedule. A power of two (the half's base is `half << 10`).
pub const SCHEDULE_CAPACITY: u32 = 1 << SCHEDULE_SHIFT;
const SCHEDULE_SHIFT: i32 = 10;
/// The header bits that hold the length of the active half.
pub const HEADER_LEN_MASK: u32 = 0x7fff_ffff;
/// The header bit that names the active half.
pub const HEADER_HALF_BIT: u32 = 31;
/// Consecutive schedule positions tried before falling back to the anchor (where the
/// connection waits for sockvisor to requeue it: it is never lost). More than this many
/// scheduled listeners closed in a row before sockvisor updates the schedule (it does on
/// SIGCHLD) means mass death; 8 tries cover every position of a fleet of up to 8.
pub const MAX_TRIES: i32 = 8;
/// The anchor's member key.
pub const ANCHOR_KEY: u32 = 0;

// Helper function ids (`enum bpf_func_id` in linux/bpf.h).
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;

// Return codes of an SK_REUSEPORT program (`enum sk_action`).
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;

// Offsets in `struct sk_reuseport_md` (the program's context).
const CTX_DATA: i16 = 0;
const CTX_DATA_END: i16 = 8;
const CTX_IP_PROTOCOL: i16 = 24;
const CTX_HASH: i16 = 32;
const CTX_MIGRATING_SK: i16 = 48;

// Offset in `struct bpf_sock` of `dst_port` (the peer's port, network order, 16 bits).
const SOCK_DST_PORT: i16 = 48;

const IPPROTO_UDP: i32 = 17;

// Offset in the `counters` value of the `migrated` field (after `dispatched: u64`).
const COUNTER_MIGRATED: i32 = 8;

// Stack slots (offsets from the frame pointer R10).
/// `u32` key for map lookups.
const STACK_KEY: i16 = -4;
/// `u32` member key being selected, then counted.
const STACK_MEMBER: i16 = -8;
/// `u64` length of the active schedule half.
const STACK_LEN: i16 = -16;

/// The fds of the maps the program reads, and the capacity they were made for.
#[derive(Debug, Clone, Copy)]
pub struct MapFds {
    pub sockets: i32,
    pub schedule: i32,
    pub control: i32,
    pub cursor: i32,
    pub counters: i32,
    pub probes: i32,
    /// Worker member keys are `1..=capacity`; `capacity + 1` counts unplaced connections.
    pub capacity: u32,
}

/// `bpf_sk_select_reuseport(ctx, sockets, &member, 0)` for the key at `STACK_MEMBER`; leaves
/// 0 in R0 on success.
fn select_member(a: &mut Asm, sockets: i32) {
    a.push(mov64_reg(R1, R6)); // r1 = ctx
    a.push_wide(load_map(R2, sockets)); // r2 = sockets map
    a.push(mov64_reg(R3, R10)); // r3 = fp
    a.push(add64_imm(R3, STACK_MEMBER as i32)); // r3 = &member
    a.push(mov64_imm(R4, 0)); // r4 = flags (none)
    a.push(call(BPF_FUNC_SK_SELECT_REUSEPORT)); // r0 = 0 if selected, -errno if not
}

/// `r0 = bpf_map_lookup_elem(map, &key)` for the key at `STACK_KEY`; R0 is NULL or a pointer
/// to the value.
fn lookup_key(a: &mut Asm, map: i32) {
    a.push_wide(load_map(R1, map)); // r1 = map
    a.push(mov64_reg(R2, R10)); // r2 = fp
    a.push(add64_imm(R2, STACK_KEY as i32)); // r2 = &key
    a.push(call(BPF_FUNC_MAP_LOOKUP_ELEM)); // r0 = &value or NULL
}

/// The program's instructions for these maps. Registers kept across helper calls:
/// R6 the context; R7 the migrating socket (probe part), then the schedule position; R8 the
/// base of the active half.
pub fn instructions(maps: &MapFds) -> Vec<Insn> {
    let unselected = maps.capacity as i32 + 1;
    let mut a = Asm::new();

    a.push(mov64_reg(R6, R1)); // r6 = ctx

    // 1. Probe: the client's source port, from the migrating socket or the packet.
    a.push(load(Size::DW, R7, R6, CTX_MIGRATING_SK)); // r7 = ctx->migrating_sk (NULL: new)
    a.jump_if_imm(Cond::Eq, R7, 0, "port_from_packet"); // a new connection or datagram
    a.push(load(Size::H, R2, R7, SOCK_DST_PORT)); // r2 = migrating_sk->dst_port (network order)
    a.goto("probe_lookup");
    a.label("port_from_packet");
    a.push(load(Size::DW, R2, R6, CTX_DATA)); // r2 = start of the TCP/UDP header
    a.push(load(Size::DW, R3, R6, CTX_DATA_END)); // r3 = end of the linear data
    a.push(mov64_reg(R4, R2)); // r4 = data
    a.push(add64_imm(R4, 2)); // r4 = data + sizeof(source port)
    a.jump_if_reg(Cond::Gt, R4, R3, "schedule"); // no header bytes: not a probe
    a.push(load(Size::H, R2, R2, 0)); // r2 = source port (network order)
    a.label("probe_lookup");
    a.push(be16(R2)); // r2 = source port (host order)
    a.push(store_reg(Size::W, R10, STACK_KEY, R2)); // key = source port
    lookup_key(&mut a, maps.probes); // r0 = &probes[port] or NULL
    a.jump_if_imm(Cond::Eq, R0, 0, "schedule"); // not a probe
    a.jump_if_imm(Cond::Ne, R7, 0, "drop"); // a probe off a closed listener fails, never moves
    a.push(load(Size::W, R1, R0, 0)); // r1 = the probed member
    a.push(store_reg(Size::W, R10, STACK_MEMBER, R1)); // member = r1
    select_member(&mut a, maps.sockets);
    a.jump_if_imm(Cond::Ne, R0, 0, "drop"); // the probed member has no listener: fail
    a.goto("pass"); // probes are not counted

    // 2. Schedule: read the header of the active half.
    a.label("schedule");
    a.push(store_imm(Size::W, R10, STACK_KEY, 0)); // key = 0
    lookup_key(&mut a, maps.control); // r0 = &control[0]
    a.jump_if_imm(Cond::Eq, R0, 0, "anchor"); // (never: an array has every key)
    a.push(load(Size::W, R8, R0, 0)); // r8 = header
    a.push(mov64_reg(R9, R8)); // r9 = header
    a.push(and64_imm(R9, HEADER_LEN_MASK as i32)); // r9 = length of the active half
    a.jump_if_imm(Cond::Eq, R9, 0, "anchor"); // nobody is ready
    a.jump_if_imm(Cond::Gt, R9, SCHEDULE_CAPACITY as i32, "anchor"); // torn header: be safe
    a.push(store_reg(Size::DW, R10, STACK_LEN, R9)); // len = r9
    a.push(rsh64_imm(R8, HEADER_HALF_BIT as i32)); // r8 = active half (0 or 1)
    a.push(lsh64_imm(R8, SCHEDULE_SHIFT)); // r8 = index of its first entry

    // The turn: a flow's hash for UDP, the next round-robin turn otherwise.
    a.push(load(Size::W, R1, R6, CTX_IP_PROTOCOL)); // r1 = ctx->ip_protocol
    a.jump_if_imm(Cond::Eq, R1, IPPROTO_UDP, "by_flow");
    a.push(store_imm(Size::W, R10, STACK_KEY, 0)); // key = 0
    lookup_key(&mut a, maps.cursor); // r0 = &cursor[0]
    a.jump_if_imm(Cond::Eq, R0, 0, "anchor"); // (never)
    a.push(mov64_imm(R7, 1)); // r7 = 1
    a.push(atomic_fetch_add64(R0, 0, R7)); // r7 = cursor++ (atomic)
    a.goto("try_members");
    a.label("by_flow");
    a.push(load(Size::W, R7, R6, CTX_HASH)); // r7 = ctx->hash (the flow's 4-tuple hash)

    // Try up to MAX_TRIES consecutive positions from the turn, unrolled: a loop's back edge
    // makes the verifier walk it again and again, and without CAP_PERFMON (CAP_BPF alone,
    // as a non-root sockvisor has it) it gives up ("the sequence of 8193 jumps is too
    // complex"). A try that selects goes to "count"; one that fails falls through to the next.
    a.label("try_members");
    for _ in 0..MAX_TRIES {
        a.push(mov64_reg(R1, R7)); // r1 = position
        a.push(load(Size::DW, R2, R10, STACK_LEN)); // r2 = len
        a.push(mod64_reg(R1, R2)); // r1 = position % len
        a.push(add64_reg(R1, R8)); // r1 = index in the active half
        a.push(add64_imm(R7, 1)); // position += 1 for the next try
        a.push(store_reg(Size::W, R10, STACK_KEY, R1)); // key = index
        lookup_key(&mut a, maps.schedule); // r0 = &schedule[index]
        a.jump_if_imm(Cond::Eq, R0, 0, "anchor"); // (never: index < 2 * capacity)
        a.push(load(Size::W, R1, R0, 0)); // r1 = member key at that position
        a.push(store_reg(Size::W, R10, STACK_MEMBER, R1)); // member = r1
        select_member(&mut a, maps.sockets);
        a.jump_if_imm(Cond::Eq, R0, 0, "count"); // selected
                                                 // That member's listener is gone: the next position.
    }

    // 3. Anchor: nobody ready, or no scheduled listener left.
    a.label("anchor");
    a.push(store_imm(Size::W, R10, STACK_MEMBER, ANCHOR_KEY as i32)); // member = anchor
    select_member(&mut a, maps.sockets);
    a.jump_if_imm(Cond::Eq, R0, 0, "count"); // waits on the anchor

    // 4. Nothing selectable: the kernel's hash decides; count it.
    a.push(store_imm(Size::W, R10, STACK_MEMBER, unselected)); // member = "unselected"

    // Count the decision: counters[member].dispatched, or .migrated for a migration.
    a.label("count");
    a.push(load(Size::W, R1, R10, STACK_MEMBER)); // r1 = member
    a.push(store_reg(Size::W, R10, STACK_KEY, R1)); // key = member
    lookup_key(&mut a, maps.counters); // r0 = &counters[member]
    a.jump_if_imm(Cond::Eq, R0, 0, "pass"); // (never for keys 0..=capacity+1)
    a.push(load(Size::DW, R1, R6, CTX_MIGRATING_SK)); // r1 = ctx->migrating_sk
    a.jump_if_imm(Cond::Eq, R1, 0, "count_add"); // a new connection: .dispatched
    a.push(add64_imm(R0, COUNTER_MIGRATED)); // a migration: .migrated
    a.label("count_add");
    a.push(mov64_imm(R1, 1)); // r1 = 1
    a.push(atomic_add64(R0, 0, R1)); // counter += 1 (atomic)

    a.label("pass");
    a.push(mov64_imm(R0, SK_PASS)); // SK_PASS: use the selection (if any)
    a.push(exit());
    a.label("drop");
    a.push(mov64_imm(R0, SK_DROP)); // SK_DROP: refuse (a failed probe only)
    a.push(exit());

    a.finish()
}

/// Programs that do one thing, for measuring what the kernel does with each answer.
#[cfg(test)]
pub(crate) mod probes_of_kernel_behaviour {
    use super::*;

    /// `return SK_PASS` without selecting.
    pub fn pass_without_selection() -> Vec<Insn> {
        vec![mov64_imm(R0, SK_PASS), exit()]
    }

    /// `return SK_DROP`.
    pub fn drop_everything() -> Vec<Insn> {
        vec![mov64_imm(R0, SK_DROP), exit()]
    }

    /// Select `key` in `sockets`, ignore the result, `return SK_PASS`.
    pub fn select_key_then_pass(sockets: i32, key: u32) -> Vec<Insn> {
        let mut a = Asm::new();
        a.push(mov64_reg(R6, R1)); // r6 = ctx
        a.push(store_imm(Size::W, R10, STACK_MEMBER, key as i32)); // member = key
        select_member(&mut a, sockets);
        a.push(mov64_imm(R0, SK_PASS));
        a.push(exit());
        a.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_within_a_few_hundred_instructions() {
        let maps = MapFds {
            sockets: 3,
            schedule: 4,
            control: 5,
            cursor: 6,
            counters: 7,
            probes: 8,
            capacity: 8,
        };
        let p = instructions(&maps);
        // Each map load takes two slots; the tries are unrolled (MAX_TRIES copies).
        eprintln!("MEASURE program length: {} instruction slots", p.len());
        assert!(p.len() < 300, "{} instructions", p.len());
    }
}
