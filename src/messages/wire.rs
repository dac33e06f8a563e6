//! The message wire format, version 1 (docs/messages.md is the normative text; this module
//! is its code, used by both ends: sockvisor's router and the workers' [`super::Messages`]).
//!
//! One message is one `SOCK_SEQPACKET` packet: a 12-byte header, then the payload.
//!
//! ```text
//!  byte 0     version   (1)
//!  byte 1     kind      (1 = message; other kinds are skipped by readers of version 1)
//!  byte 2     flags     (0; readers ignore bits they do not know)
//!  byte 3     reserved  (0)
//!  bytes 4-7  from      u32 little endian: a slot, or OPERATOR
//!  bytes 8-11 to        u32 little endian: a slot, ALL or OPERATOR
//!  bytes 12.. payload   0 to MAX_PAYLOAD opaque bytes
//! ```
//!
//! `from` is stamped by sockvisor: whatever a worker writes there is replaced by its slot.

/// The format version this crate speaks.
pub const VERSION: u8 = 1;
/// A message (the only kind of version 1).
pub const KIND_MESSAGE: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 12;
/// The largest payload: 64 KiB.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The largest packet.
pub const MAX_PACKET: usize = HEADER_LEN + MAX_PAYLOAD;
/// The address of the operator (sockvisor and its `messages --follow` clients).
pub const OPERATOR: u32 = u32::MAX;
/// The address of every worker but the sender (a broadcast); only as `to`.
pub const ALL: u32 = u32::MAX - 1;

/// Who sends or receives a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Address {
    /// The worker of this slot (`SOCKVISOR_WORKER_ID`).
    Slot(u32),
    /// Every worker but the sender.
    All,
    /// sockvisor's operator: `sockvisor send`, `sockvisor messages --follow`.
    Operator,
}

impl Address {
    pub fn to_u32(self) -> u32 {
        match self {
            Address::Slot(s) => s,
            Address::All => ALL,
            Address::Operator => OPERATOR,
        }
    }

    pub fn from_u32(v: u32) -> Address {
        match v {
            ALL => Address::All,
            OPERATOR => Address::Operator,
            s => Address::Slot(s),
        }
    }
}

/// Why a packet is not a message of this version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header.
    Short(usize),
    /// Longer than [`MAX_PACKET`].
    TooLong(usize),
    Version(u8),
    Kind(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Short(n) => write!(
                f,
                "packet of {n} bytes, shorter than the {HEADER_LEN}-byte header"
            ),
            DecodeError::TooLong(n) => write!(f, "packet of {n} bytes, more than {MAX_PACKET}"),
            DecodeError::Version(v) => write!(f, "message version {v}, expected {VERSION}"),
            DecodeError::Kind(k) => write!(f, "unknown message kind {k}"),
        }
    }
}

/// A payload over [`MAX_PAYLOAD`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge(pub usize);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "payload of {} bytes is larger than the {MAX_PAYLOAD} bytes a message carries",
            self.0
        )
    }
}

impl std::error::Error for TooLarge {}

/// The packet for one message.
pub fn encode(from: Address, to: Address, payload: &[u8]) -> Result<Vec<u8>, TooLarge> {
    if payload.len() > MAX_PAYLOAD {
        return Err(TooLarge(payload.len()));
    }
    let mut packet = Vec::with_capacity(HEADER_LEN + payload.len());
    packet.extend_from_slice(&[VERSION, KIND_MESSAGE, 0, 0]);
    packet.extend_from_slice(&from.to_u32().to_le_bytes());
    packet.extend_from_slice(&to.to_u32().to_le_bytes());
    packet.extend_from_slice(payload);
    Ok(packet)
}

/// A decoded message, borrowing its payload from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub from: Address,
    pub to: Address,
    pub payload: &'a [u8],
}

pub fn decode(packet: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    if packet.len() < HEADER_LEN {
        return Err(DecodeError::Short(packet.len()));
    }
    if packet.len() > MAX_PACKET {
        return Err(DecodeError::TooLong(packet.len()));
    }
    if packet[0] != VERSION {
        return Err(DecodeError::Version(packet[0]));
    }
    if packet[1] != KIND_MESSAGE {
        return Err(DecodeError::Kind(packet[1]));
    }
    let word =
        |i: usize| u32::from_le_bytes([packet[i], packet[i + 1], packet[i + 2], packet[i + 3]]);
    Ok(Decoded {
        from: Address::from_u32(word(4)),
        to: Address::from_u32(word(8)),
        payload: &packet[HEADER_LEN..],
    })
}

/// Stamp `from` into a packet already checked by [`decode`] (sockvisor does this to every
/// message a worker sends: a worker cannot pose as another).
pub fn set_from(packet: &mut [u8], from: Address) {
    packet[4..8].copy_from_slice(&from.to_u32().to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for (from, to) in [
            (Address::Operator, Address::Slot(0)),
            (Address::Slot(3), Address::All),
            (Address::Slot(1023), Address::Operator),
        ] {
            for payload in [&b""[..], b"hello", &[0u8; MAX_PAYLOAD]] {
                let p = encode(from, to, payload).unwrap();
                assert_eq!(p.len(), HEADER_LEN + payload.len());
                assert_eq!(decode(&p), Ok(Decoded { from, to, payload }));
            }
        }
        assert_eq!(
            encode(Address::Operator, Address::All, &[0; MAX_PAYLOAD + 1]),
            Err(TooLarge(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn the_documented_bytes() {
        let p = encode(Address::Slot(2), Address::Operator, b"hi").unwrap();
        assert_eq!(p, [1, 1, 0, 0, 2, 0, 0, 0, 255, 255, 255, 255, b'h', b'i']);
        let mut p = encode(Address::Slot(9), Address::All, b"").unwrap();
        assert_eq!(&p[8..12], &[254, 255, 255, 255]);
        set_from(&mut p, Address::Slot(7));
        assert_eq!(decode(&p).unwrap().from, Address::Slot(7));
    }

    #[test]
    fn rejects_what_is_not_a_message() {
        assert_eq!(decode(&[1, 1, 0]), Err(DecodeError::Short(3)));
        assert_eq!(
            decode(&[2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Version(2))
        );
        assert_eq!(
            decode(&[1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Kind(9))
        );
        assert_eq!(
            decode(&vec![1; MAX_PACKET + 1]),
            Err(DecodeError::TooLong(MAX_PACKET + 1))
        );
    }
}
