//! eBPF instructions, encoded by hand: one small named constructor per instruction form the
//! reuseport program uses, and [`Asm`], a list of instructions with named jump labels.
//!
//! Encoding (Documentation/bpf/standardization/instruction-set.rst, `struct bpf_insn` in
//! linux/bpf.h): 8 bytes, `code` (class | size/op | mode/source), `dst_reg` in the low nibble
//! and `src_reg` in the high nibble of the second byte (little-endian bitfield), a signed
//! 16-bit offset and a signed 32-bit immediate. A 64-bit immediate load takes two slots.

use std::collections::HashMap;

// Instruction classes (`BPF_CLASS`).
const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU: u8 = 0x04;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;

// Load/store sizes (`BPF_SIZE`).
const BPF_W: u8 = 0x00;
const BPF_H: u8 = 0x08;
const BPF_B: u8 = 0x10;
const BPF_DW: u8 = 0x18;

// Load/store modes (`BPF_MODE`).
const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_ATOMIC: u8 = 0xc0;

// ALU operations (`BPF_OP`).
const BPF_ADD: u8 = 0x00;
const BPF_AND: u8 = 0x50;
const BPF_LSH: u8 = 0x60;
const BPF_RSH: u8 = 0x70;
const BPF_MOD: u8 = 0x90;
const BPF_MOV: u8 = 0xb0;
const BPF_END: u8 = 0xd0;

// Jump operations (`BPF_OP` in the JMP class).
const BPF_JA: u8 = 0x00;
const BPF_JEQ: u8 = 0x10;
const BPF_JGT: u8 = 0x20;
const BPF_JNE: u8 = 0x50;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;

// Operand source (`BPF_SRC`): the immediate (K) or the source register (X). For BPF_END,
// BPF_X means "to big endian" (`BPF_TO_BE`).
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
const BPF_TO_BE: u8 = 0x08;

// Atomic operations (the immediate of a BPF_ATOMIC instruction).
const BPF_ATOMIC_ADD: i32 = BPF_ADD as i32;
const BPF_FETCH: i32 = 0x01;

/// `src_reg` of a 64-bit immediate load whose immediate is a map fd (`BPF_PSEUDO_MAP_FD`).
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// One 8-byte eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The eleven registers: R0 return value, R1-R5 arguments (clobbered by calls), R6-R9 kept
/// across calls, R10 the read-only frame pointer (the stack grows down from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    R0 = 0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    R10,
}

/// Access width of a load or store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// 8 bits.
    B,
    /// 16 bits.
    H,
    /// 32 bits.
    W,
    /// 64 bits.
    DW,
}

impl Size {
    fn bits(self) -> u8 {
        match self {
            Size::B => BPF_B,
            Size::H => BPF_H,
            Size::W => BPF_W,
            Size::DW => BPF_DW,
        }
    }
}

/// Jump conditions (unsigned comparisons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    Eq,
    Ne,
    /// Unsigned greater than.
    Gt,
}

impl Cond {
    fn op(self) -> u8 {
        match self {
            Cond::Eq => BPF_JEQ,
            Cond::Ne => BPF_JNE,
            Cond::Gt => BPF_JGT,
        }
    }
}

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (dst as u8) | ((src as u8) << 4),
        off,
        imm,
    }
}

/// `dst = src` (64 bits).
pub fn mov64_reg(dst: Reg, src: Reg) -> Insn {
    insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, 0, 0)
}

/// `dst = imm` (sign-extended to 64 bits).
pub fn mov64_imm(dst: Reg, imm: i32) -> Insn {
    insn(BPF_ALU64 | BPF_MOV | BPF_K, dst, Reg::R0, 0, imm)
}

/// `dst += imm` (64 bits).
pub fn add64_imm(dst: Reg, imm: i32) -> Insn {
    insn(BPF_ALU64 | BPF_ADD | BPF_K, dst, Reg::R0, 0, imm)
}

/// `dst += src` (64 bits).
pub fn add64_reg(dst: Reg, src: Reg) -> Insn {
    insn(BPF_ALU64 | BPF_ADD | BPF_X, dst, src, 0, 0)
}

/// `dst &= imm` (64 bits).
pub fn and64_imm(dst: Reg, imm: i32) -> Insn {
    insn(BPF_ALU64 | BPF_AND | BPF_K, dst, Reg::R0, 0, imm)
}

/// `dst >>= imm` (64 bits, logical).
pub fn rsh64_imm(dst: Reg, imm: i32) -> Insn {
    insn(BPF_ALU64 | BPF_RSH | BPF_K, dst, Reg::R0, 0, imm)
}

/// `dst <<= imm` (64 bits).
pub fn lsh64_imm(dst: Reg, imm: i32) -> Insn {
    insn(BPF_ALU64 | BPF_LSH | BPF_K, dst, Reg::R0, 0, imm)
}

/// `dst %= src` (64 bits, unsigned; the kernel defines `x % 0 == x`).
pub fn mod64_reg(dst: Reg, src: Reg) -> Insn {
    insn(BPF_ALU64 | BPF_MOD | BPF_X, dst, src, 0, 0)
}

/// `dst = htobe16(dst)`: the low 16 bits byte-swapped on a little-endian machine, upper bits
/// cleared. Turns a port read from a packet (network order) into a host-order number.
pub fn be16(dst: Reg) -> Insn {
    insn(BPF_ALU | BPF_END | BPF_TO_BE, dst, Reg::R0, 0, 16)
}

/// `dst = *(size *)(src + off)`.
pub fn load(size: Size, dst: Reg, src: Reg, off: i16) -> Insn {
    insn(BPF_LDX | size.bits() | BPF_MEM, dst, src, off, 0)
}

/// `*(size *)(base + off) = src`.
pub fn store_reg(size: Size, base: Reg, off: i16, src: Reg) -> Insn {
    insn(BPF_STX | size.bits() | BPF_MEM, base, src, off, 0)
}

/// `*(size *)(base + off) = imm`.
pub fn store_imm(size: Size, base: Reg, off: i16, imm: i32) -> Insn {
    insn(BPF_ST | size.bits() | BPF_MEM, base, Reg::R0, off, imm)
}

/// `lock *(u64 *)(base + off) += src`.
pub fn atomic_add64(base: Reg, off: i16, src: Reg) -> Insn {
    insn(
        BPF_STX | BPF_DW | BPF_ATOMIC,
        base,
        src,
        off,
        BPF_ATOMIC_ADD,
    )
}

/// `src = atomic_fetch_add((u64 *)(base + off), src)`: adds and returns the old value
/// (Linux 5.12+).
pub fn atomic_fetch_add64(base: Reg, off: i16, src: Reg) -> Insn {
    insn(
        BPF_STX | BPF_DW | BPF_ATOMIC,
        base,
        src,
        off,
        BPF_ATOMIC_ADD | BPF_FETCH,
    )
}

/// `dst = map` (the kernel replaces the fd by the map's address): two instruction slots.
pub fn load_map(dst: Reg, map_fd: i32) -> [Insn; 2] {
    [
        Insn {
            code: BPF_LD | BPF_DW | BPF_IMM,
            regs: (dst as u8) | (BPF_PSEUDO_MAP_FD << 4),
            off: 0,
            imm: map_fd,
        },
        Insn {
            code: 0,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ]
}

/// `r0 = helper(r1, ..., r5)`; R1-R5 are clobbered.
pub fn call(helper: i32) -> Insn {
    insn(BPF_JMP | BPF_CALL, Reg::R0, Reg::R0, 0, helper)
}

/// `return r0`.
pub fn exit() -> Insn {
    insn(BPF_JMP | BPF_EXIT, Reg::R0, Reg::R0, 0, 0)
}

/// A program under construction: instructions plus named labels for jumps, resolved by
/// [`Asm::finish`] (a jump's offset counts instructions from the one after it).
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    pub fn new() -> Asm {
        Asm::default()
    }

    /// Append one instruction.
    pub fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }

    /// Append a two-slot instruction ([`load_map`]).
    pub fn push_wide(&mut self, pair: [Insn; 2]) {
        self.insns.extend(pair);
    }

    /// Name the next instruction.
    pub fn label(&mut self, name: &'static str) {
        let previous = self.labels.insert(name, self.insns.len());
        assert!(previous.is_none(), "label {name} defined twice");
    }

    /// `goto label`.
    pub fn goto(&mut self, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.insns
            .push(insn(BPF_JMP | BPF_JA, Reg::R0, Reg::R0, 0, 0));
    }

    /// `if reg <cond> imm goto label`.
    pub fn jump_if_imm(&mut self, cond: Cond, reg: Reg, imm: i32, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.insns
            .push(insn(BPF_JMP | cond.op() | BPF_K, reg, Reg::R0, 0, imm));
    }

    /// `if a <cond> b goto label`.
    pub fn jump_if_reg(&mut self, cond: Cond, a: Reg, b: Reg, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.insns
            .push(insn(BPF_JMP | cond.op() | BPF_X, a, b, 0, 0));
    }

    /// The finished instructions. Panics on a jump to a label never defined or out of a
    /// 16-bit offset's reach: both are mistakes in the program text, caught by its unit test.
    pub fn finish(mut self) -> Vec<Insn> {
        for (at, label) in self.fixups {
            let target = *self
                .labels
                .get(label)
                .unwrap_or_else(|| panic!("jump to undefined label {label}"));
            let off = target as i64 - (at as i64 + 1);
            self.insns[at].off = i16::try_from(off).expect("jump offset fits in 16 bits");
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(i: Insn) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[0] = i.code;
        out[1] = i.regs;
        out[2..4].copy_from_slice(&i.off.to_le_bytes());
        out[4..8].copy_from_slice(&i.imm.to_le_bytes());
        out
    }

    #[test]
    fn encodings_match_the_kernel_macros() {
        // BPF_MOV64_REG(BPF_REG_6, BPF_REG_1)
        assert_eq!(
            bytes(mov64_reg(Reg::R6, Reg::R1)),
            [0xbf, 0x16, 0, 0, 0, 0, 0, 0]
        );
        // BPF_ST_MEM(BPF_W, BPF_REG_10, -4, 0)
        assert_eq!(
            bytes(store_imm(Size::W, Reg::R10, -4, 0)),
            [0x62, 0x0a, 0xfc, 0xff, 0, 0, 0, 0]
        );
        // BPF_ATOMIC_OP(BPF_DW, BPF_ADD | BPF_FETCH, BPF_REG_0, BPF_REG_1, 0)
        assert_eq!(
            bytes(atomic_fetch_add64(Reg::R0, 0, Reg::R1)),
            [0xdb, 0x10, 0, 0, 1, 0, 0, 0]
        );
        // BPF_LD_MAP_FD(BPF_REG_1, 7)
        let [a, b] = load_map(Reg::R1, 7);
        assert_eq!(bytes(a), [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        assert_eq!(bytes(b), [0; 8]);
        // BPF_ENDIAN(BPF_TO_BE, BPF_REG_2, 16)
        assert_eq!(bytes(be16(Reg::R2)), [0xdc, 0x02, 0, 0, 16, 0, 0, 0]);
        // BPF_EMIT_CALL(BPF_FUNC_sk_select_reuseport)
        assert_eq!(bytes(call(82)), [0x85, 0, 0, 0, 82, 0, 0, 0]);
        assert_eq!(bytes(exit()), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn labels_resolve_forward_and_backward() {
        let mut a = Asm::new();
        a.label("top");
        a.jump_if_imm(Cond::Eq, Reg::R0, 0, "end"); // 0: +2
        a.push(mov64_imm(Reg::R0, 1)); // 1
        a.goto("top"); // 2: -3
        a.label("end");
        a.push(exit()); // 3
        let p = a.finish();
        assert_eq!(p[0].off, 2);
        assert_eq!(p[2].off, -3);
    }
}
