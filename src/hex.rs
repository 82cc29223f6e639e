//! Lower-case hexadecimal, the one encoding of hashes, ids and tokens in
//! text. A leaf: it knows no other module.

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The bytes of even-length hex text of at most 512 digits (any case);
/// `None` for anything else (a sign included, which `from_str_radix` would
/// take: "+1" is not a hex byte).
pub fn decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2)
        || text.len() > 512
        || !text.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(encode(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(decode("00abff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(decode("00ABFF"), Some(vec![0, 0xab, 0xff]));
        for bad in ["0", "zz", "é1", "+1", &"0".repeat(514)] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
