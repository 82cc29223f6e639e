//! The API key format and its hashing.
//!
//! A key reads `agw_<key id>_<secret>`: the key id is 16 hex digits (public,
//! safe to log, the database lookup key) and the secret 64 hex digits (256
//! bits from the OS random source). Only SHA-256 of the whole key is stored.
//! A pepper would add nothing here: a 256-bit random secret cannot be guessed
//! from its hash, which is what peppers protect low-entropy passwords from.
//! Hashes are compared in constant time.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The OS random source failed: no key can be made safely.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the OS random source: {0}")]
pub struct KeyError(String);

const PREFIX: &str = "agw_";
const KEY_ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Length of a well-formed key: prefix, id, separator, secret.
pub const KEY_LEN: usize = PREFIX.len() + 2 * KEY_ID_BYTES + 1 + 2 * SECRET_BYTES;

/// SHA-256 of a full key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

impl KeyHash {
    pub fn of(full_key: &str) -> KeyHash {
        KeyHash(Sha256::digest(full_key.as_bytes()).into())
    }

    pub fn to_hex(self) -> String {
        crate::hex::encode(&self.0)
    }

    pub fn from_hex(text: &str) -> Option<KeyHash> {
        let bytes = crate::hex::decode(text)?;
        Some(KeyHash(bytes.try_into().ok()?))
    }

    /// Constant-time equality, so timing does not reveal how much matched.
    pub fn matches(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// A presented key split into its public id and the hash of the whole.
#[derive(Debug)]
pub struct PresentedKey<'a> {
    pub key_id: &'a str,
    pub hash: KeyHash,
}

/// Operator tokens read `agwop_<operator id>_<secret>`, in the keys' form.
pub const OPERATOR_PREFIX: &str = "agwop_";

/// Splits and hashes a presented key; `None` if it is not of our format.
/// Never echoes the input.
pub fn parse(presented: &str) -> Option<PresentedKey<'_>> {
    parse_prefixed(PREFIX, presented)
}

/// As [`parse`], for an operator token.
pub fn parse_operator(presented: &str) -> Option<PresentedKey<'_>> {
    parse_prefixed(OPERATOR_PREFIX, presented)
}

fn parse_prefixed<'a>(prefix: &str, presented: &'a str) -> Option<PresentedKey<'a>> {
    if presented.len() != KEY_LEN - PREFIX.len() + prefix.len() || !presented.starts_with(prefix) {
        return None;
    }
    let rest = &presented[prefix.len()..];
    let (key_id, secret) = rest.split_once('_')?;
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if key_id.len() != 2 * KEY_ID_BYTES || !lower_hex(key_id) || !lower_hex(secret) {
        return None;
    }
    Some(PresentedKey {
        key_id,
        hash: KeyHash::of(presented),
    })
}

/// A fresh key id.
pub fn new_key_id() -> Result<String, KeyError> {
    Ok(crate::hex::encode(&random::<KEY_ID_BYTES>()?))
}

/// A fresh secret under `key_id`: the full key and its hash.
pub fn new_secret(key_id: &str) -> Result<(SecretString, KeyHash), KeyError> {
    new_token(PREFIX, key_id)
}

/// A fresh operator token under `operator_id`, and its hash.
pub fn new_operator_token(operator_id: &str) -> Result<(SecretString, KeyHash), KeyError> {
    new_token(OPERATOR_PREFIX, operator_id)
}

fn new_token(prefix: &str, id: &str) -> Result<(SecretString, KeyHash), KeyError> {
    let secret = crate::hex::encode(&random::<SECRET_BYTES>()?);
    let full = SecretString::from(format!("{prefix}{id}_{secret}"));
    let hash = KeyHash::of(full.expose_secret());
    Ok((full, hash))
}

fn random<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| KeyError(e.to_string()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_to_their_id_and_hash() {
        let id = new_key_id().expect("id");
        let (full, hash) = new_secret(&id).expect("secret");
        let parsed = parse(full.expose_secret()).expect("well formed");
        assert_eq!(parsed.key_id, id);
        assert!(parsed.hash.matches(&hash));
        assert_eq!(KeyHash::from_hex(&hash.to_hex()), Some(hash));
    }

    #[test]
    fn secrets_differ_and_carry_256_bits() {
        let id = new_key_id().expect("id");
        let (a, _) = new_secret(&id).expect("a");
        let (b, _) = new_secret(&id).expect("b");
        assert_ne!(a.expose_secret(), b.expose_secret());
        let secret_hex = a.expose_secret().rsplit('_').next().expect("secret part");
        assert_eq!(secret_hex.len() * 4, 256);
    }

    #[test]
    fn malformed_keys_are_refused() {
        let id = new_key_id().expect("id");
        let (full, _) = new_secret(&id).expect("secret");
        let full = full.expose_secret();
        assert!(parse("").is_none());
        assert!(parse("Bearer x").is_none());
        assert!(parse(&full.to_uppercase()).is_none());
        assert!(parse(&full[..full.len() - 1]).is_none());
        assert!(parse(&format!("{full}0")).is_none());
        assert!(parse(&full.replacen("agw_", "xyz_", 1)).is_none());
    }
}
