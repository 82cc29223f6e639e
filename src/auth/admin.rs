//! The operator's credential: a bootstrap admin token, held only as its
//! SHA-256 once start-up has read it.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest admin token accepted: guessing must be hopeless.
pub const MIN_ADMIN_TOKEN_LEN: usize = 24;

#[derive(Clone)]
pub struct AdminCredential {
    sha256: [u8; 32],
}

impl std::fmt::Debug for AdminCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminCredential(..)")
    }
}

impl AdminCredential {
    /// From the token itself; the caller drops the token afterwards.
    pub fn from_token(token: &SecretString) -> AdminCredential {
        AdminCredential {
            sha256: Sha256::digest(token.expose_secret().as_bytes()).into(),
        }
    }

    /// From a hex SHA-256, so the token itself never has to reach the server.
    pub fn from_sha256_hex(hex: &str) -> Option<AdminCredential> {
        let bytes = crate::hex::decode(hex)?;
        Some(AdminCredential {
            sha256: bytes.try_into().ok()?,
        })
    }

    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.sha256.ct_eq(&digest).into()
    }
}
