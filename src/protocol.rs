//! The channel wire protocol between sockvisor and a worker (docs/protocol.md is the
//! normative text; this module is its code).
//!
//! A channel is one end of a `socketpair(AF_UNIX, SOCK_SEQPACKET)`, placed in the worker's
//! `LISTEN_FDS` where a listening socket would be. A worker tells the two apart with
//! `SO_TYPE`: `SOCK_SEQPACKET` is a channel, `SOCK_STREAM` a listening socket (shared mode).
//!
//! Every message is exactly [`MSG_LEN`] bytes:
//!
//! ```text
//!  byte 0    version   (1)
//!  byte 1    kind      (1 = connection, sockvisor -> worker, exactly one fd in SCM_RIGHTS;
//!                       2 = closed, worker -> sockvisor, no fd)
//!  byte 2    flags     (connection: bit 0 = sockvisor wants a `closed` report for it)
//!  byte 3    reserved  (0)
//!  bytes 4-7 value     u32 little endian (connection: sequence number on this channel;
//!                       closed: how many connections the worker closed)
//! ```
//!
//! Only receiving is mandatory: a worker that never sends anything is a correct worker.

/// Size of every message in both directions.
pub const MSG_LEN: usize = 8;
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// sockvisor -> worker: a connection, with its fd in `SCM_RIGHTS`.
pub const KIND_CONNECTION: u8 = 1;
/// worker -> sockvisor: `value` connections were closed.
pub const KIND_CLOSED: u8 = 2;
/// Connection flag: sockvisor counts open connections for this listener (least-connections)
/// and would like a `closed` report when the worker is done with it.
pub const FLAG_REPORT_CLOSE: u8 = 1;

/// A decoded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Connection { report_close: bool, sequence: u32 },
    Closed { count: u32 },
}

/// Why a message was not understood. Unknown versions and kinds are errors for the reader,
/// which skips the message (and closes any fd that came with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    Length(usize),
    Version(u8),
    Kind(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Length(n) => write!(f, "message of {n} bytes, expected {MSG_LEN}"),
            DecodeError::Version(v) => write!(f, "protocol version {v}, expected {VERSION}"),
            DecodeError::Kind(k) => write!(f, "unknown message kind {k}"),
        }
    }
}

impl Message {
    pub fn encode(self) -> [u8; MSG_LEN] {
        let (kind, flags, value) = match self {
            Message::Connection {
                report_close,
                sequence,
            } => (
                KIND_CONNECTION,
                if report_close { FLAG_REPORT_CLOSE } else { 0 },
                sequence,
            ),
            Message::Closed { count } => (KIND_CLOSED, 0, count),
        };
        let v = value.to_le_bytes();
        [VERSION, kind, flags, 0, v[0], v[1], v[2], v[3]]
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        if bytes.len() != MSG_LEN {
            return Err(DecodeError::Length(bytes.len()));
        }
        if bytes[0] != VERSION {
            return Err(DecodeError::Version(bytes[0]));
        }
        let value = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        match bytes[1] {
            KIND_CONNECTION => Ok(Message::Connection {
                report_close: bytes[2] & FLAG_REPORT_CLOSE != 0,
                sequence: value,
            }),
            KIND_CLOSED => Ok(Message::Closed { count: value }),
            k => Err(DecodeError::Kind(k)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for m in [
            Message::Connection {
                report_close: true,
                sequence: 7,
            },
            Message::Connection {
                report_close: false,
                sequence: u32::MAX,
            },
            Message::Closed { count: 3 },
        ] {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Message::decode(&[1, 2, 3]), Err(DecodeError::Length(3)));
        assert_eq!(
            Message::decode(&[9, 1, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Version(9))
        );
        assert_eq!(
            Message::decode(&[1, 7, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Kind(7))
        );
    }
}
