//! The `Ascend-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "t.body" under the endpoint's signing secret>`, the scheme Stripe made
//! familiar. The timestamp is inside the signed text, so a receiver that
//! also rejects old timestamps is safe from replays.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header's name.
pub const HEADER: &str = "ascend-signature";

/// The header value for `body` sent at `unix_secs`.
pub fn sign(secret: &str, unix_secs: i64, body: &[u8]) -> String {
    format!(
        "t={unix_secs},v1={}",
        crate::hex::encode(&mac(secret, unix_secs, body))
    )
}

fn mac(secret: &str, unix_secs: i64, body: &[u8]) -> Vec<u8> {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(unix_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// A new signing secret: `whsec_` and 256 random bits in hex.
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("whsec_{}", crate::hex::encode(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 checks the HMAC itself; the header wraps it.
    #[test]
    fn the_mac_is_hmac_sha256_of_t_dot_body() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").expect("key");
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            crate::hex::encode(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let header = sign("whsec_k", 1_700_000_000, b"{}");
        let mut expected = Hmac::<Sha256>::new_from_slice(b"whsec_k").expect("key");
        expected.update(b"1700000000.{}");
        assert_eq!(
            header,
            format!(
                "t=1700000000,v1={}",
                crate::hex::encode(&expected.finalize().into_bytes())
            )
        );
    }

    #[test]
    fn secrets_are_long_and_different() {
        let (a, b) = (new_secret().expect("rng"), new_secret().expect("rng"));
        assert_ne!(a, b);
        assert_eq!(a.len(), "whsec_".len() + 64);
    }
}
