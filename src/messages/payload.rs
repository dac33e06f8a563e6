//! Payloads in the control socket's JSON lines: opaque bytes travel as `"payload"` (the
//! bytes, when they are UTF-8 text) or `"payload_base64"` (standard base64 with padding,
//! RFC 4648 section 4, for anything else).

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `(payload, payload_base64)`: exactly one is set.
pub fn to_json(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text.to_string()), None),
        Err(_) => (None, Some(base64_encode(bytes))),
    }
}

/// The bytes of a request's `payload` or `payload_base64` (exactly one must be given).
pub fn from_json(text: Option<&str>, base64: Option<&str>) -> Result<Vec<u8>, String> {
    match (text, base64) {
        (Some(t), None) => Ok(t.as_bytes().to_vec()),
        (None, Some(b)) => base64_decode(b),
        (None, None) => Err("no payload: give \"payload\" (text) or \"payload_base64\"".into()),
        (Some(_), Some(_)) => Err("give \"payload\" or \"payload_base64\", not both".into()),
    }
}

pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("payload_base64 is not base64 (RFC 4648, with padding): {text:.40}");
    let t = text.as_bytes();
    if t.len() % 4 != 0 {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(t.len() / 4 * 3);
    for (i, quad) in t.chunks(4).enumerate() {
        let last = i + 1 == t.len() / 4;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(bad());
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = ALPHABET.iter().position(|&a| a == c).ok_or_else(bad)?;
            n = n << 6 | v as u32;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_rfc4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), coded);
            assert_eq!(base64_decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9*"] {
            assert!(base64_decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_or_base64() {
        assert_eq!(to_json(b"hi"), (Some("hi".into()), None));
        assert_eq!(to_json(&[0xff]), (None, Some("/w==".into())));
        assert_eq!(from_json(Some("hi"), None).unwrap(), b"hi");
        assert_eq!(from_json(None, Some("/w==")).unwrap(), [0xff]);
        assert!(from_json(None, None).is_err());
        assert!(from_json(Some("a"), Some("YQ==")).is_err());
    }
}
