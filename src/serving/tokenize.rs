//! Tokenization off the async runtime for prompts large enough to matter.
//!
//! A short prompt is tokenized where it arrives (microseconds: a thread
//! hand-off would cost more). A long one goes to the blocking pool, at most
//! [`TokenizePool::new`]'s `concurrency` at a time, so a tenant sending
//! large prompts delays only other large prompts, never the runtime's
//! threads that every other request needs. Knows tokenizers only as a
//! closure to run.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Prompts up to this many bytes are tokenized inline.
pub const INLINE_TOKENIZE_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("tokenization was interrupted")]
    Interrupted,
}

#[derive(Clone)]
pub struct TokenizePool {
    permits: Arc<Semaphore>,
}

impl TokenizePool {
    pub fn new(concurrency: usize) -> TokenizePool {
        TokenizePool {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// A pool as wide as the machine.
    pub fn for_this_machine() -> TokenizePool {
        Self::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Runs `tokenize` (over `bytes` bytes of input) inline when small, else
    /// on the blocking pool once a slot is free.
    pub async fn run<T: Send + 'static>(
        &self,
        bytes: usize,
        tokenize: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TokenizeError> {
        if bytes <= INLINE_TOKENIZE_BYTES {
            return Ok(tokenize());
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TokenizeError::Interrupted)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            tokenize()
        })
        .await
        .map_err(|_| TokenizeError::Interrupted)
    }
}

impl crate::error::Classified for TokenizeError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Internal
    }
}
