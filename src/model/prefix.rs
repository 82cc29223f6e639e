//! Content addresses of KV blocks for prefix caching: a hash chain over (isolation scope,
//! model, the previous block's hash, the block's token ids).
//!
//! Owns the hash and what goes into it. Two prompts that share their first `n` full blocks of
//! tokens under the same scope have the same first `n` block hashes, and nothing else does:
//! the hash is 128 bits of two independently keyed SipHash-1-3 instances (random keys per
//! process), so a stranger can neither predict nor construct a collision, and a chance one
//! among a pool's blocks has odds near 2^-100. It must not know pools, tenants or scheduling:
//! the scope is an opaque string the caller chooses.

use std::hash::{BuildHasher, Hasher, RandomState};

/// Address of one full KV block: its tokens and everything before them, in one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(u128);

/// Hashes blocks for one served model. Clones hash alike (same keys), so a router and the
/// model's workers agree on every address.
#[derive(Debug, Clone)]
pub struct PrefixHasher {
    model: String,
    high: RandomState,
    low: RandomState,
}

impl PrefixHasher {
    /// A hasher with fresh random keys for the model `model`.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            high: RandomState::new(),
            low: RandomState::new(),
        }
    }

    fn combine(&self, feed: impl Fn(&mut dyn Hasher)) -> BlockHash {
        let mut high = self.high.build_hasher();
        let mut low = self.low.build_hasher();
        feed(&mut high);
        feed(&mut low);
        BlockHash((u128::from(high.finish()) << 64) | u128::from(low.finish()))
    }

    /// The chain's start for `scope`: the parent of a sequence's first block.
    pub fn root(&self, scope: &str) -> BlockHash {
        self.combine(|h| {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            h.write_usize(self.model.len());
            h.write(self.model.as_bytes());
            h.write_usize(scope.len());
            h.write(scope.as_bytes());
        })
    }

    /// The hash of a block of `tokens` after the block hashed `parent`.
    pub fn next(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        self.combine(|h| {
            h.write_u128(parent.0);
            h.write_usize(tokens.len());
            for &t in tokens {
                h.write_u32(t);
            }
        })
    }

    /// The hashes of every full block of `tokens` (`block_size` tokens each) in `scope`.
    pub fn chain(&self, scope: &str, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        let mut parent = self.root(scope);
        tokens
            .chunks_exact(block_size.max(1))
            .map(|block| {
                parent = self.next(parent, block);
                parent
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_share_hashes_and_nothing_else_does() {
        let h = PrefixHasher::new("m");
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[20] = 999; // differs in the second block of 16
        let (ca, cb) = (h.chain("t1", &a, 16), h.chain("t1", &b, 16));
        assert_eq!(ca.len(), 2, "only full blocks");
        assert_eq!(ca[0], cb[0]);
        assert_ne!(ca[1], cb[1]);
        assert_ne!(h.chain("t2", &a, 16)[0], ca[0], "scopes are apart");
        assert_ne!(
            PrefixHasher::new("m").chain("t1", &a, 16)[0],
            ca[0],
            "keys are per hasher"
        );
        assert_eq!(h.clone().chain("t1", &a, 16), ca, "clones agree");
        // The scope and model are length-prefixed.
        let with_model = |model: &str| PrefixHasher {
            model: model.to_owned(),
            ..h.clone()
        };
        assert_ne!(with_model("ab").root("c"), with_model("a").root("bc"));
    }
}
