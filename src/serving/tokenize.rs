//! Tokenization off the async runtime: every prompt is tokenized on a small
//! pool of dedicated threads, so the runtime's threads, which every other
//! request needs, never run it. Large prompts (over
//! [`LARGE_PROMPT_BYTES`]) may occupy all but one of the pool's threads at
//! a time, so a tenant sending large prompts delays only other large
//! prompts, never the short ones. Knows tokenizers only as a closure to
//! run.

use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::{Semaphore, oneshot};

/// Prompts over this many bytes count as large.
pub const LARGE_PROMPT_BYTES: usize = 16 * 1024;

/// Tokenizations waiting for a thread; past it callers wait for room.
const QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("tokenization was interrupted")]
    Interrupted,
}

type Task = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct TokenizePool {
    tasks: mpsc::SyncSender<Task>,
    /// Room in the queue, so waiting for it is async rather than blocking.
    room: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl TokenizePool {
    /// A pool of `threads` threads (at least 2, so one is always free for
    /// short prompts).
    pub fn new(threads: usize) -> TokenizePool {
        let threads = threads.max(2);
        let (tasks, receiver) = mpsc::sync_channel::<Task>(QUEUE);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..threads {
            let receiver = receiver.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tokenize-{n}"))
                .spawn(move || {
                    loop {
                        // One waiting thread holds the lock at a time; the
                        // task runs after it is released.
                        let task = match receiver.lock() {
                            Ok(receiver) => receiver.recv(),
                            Err(_) => return,
                        };
                        match task {
                            // A panicking tokenizer fails its one request
                            // (its reply is dropped), not the thread.
                            Ok(task) => {
                                let _ =
                                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
                            }
                            // Every pool handle is gone.
                            Err(_) => return,
                        }
                    }
                });
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start a tokenizer thread");
            }
        }
        TokenizePool {
            tasks,
            room: Arc::new(Semaphore::new(QUEUE)),
            large: Arc::new(Semaphore::new(threads - 1)),
        }
    }

    /// A pool as wide as the machine.
    pub fn for_this_machine() -> TokenizePool {
        Self::new(std::thread::available_parallelism().map_or(2, usize::from))
    }

    /// Runs `tokenize` (over `bytes` bytes of input) on the pool.
    pub async fn run<T: Send + 'static>(
        &self,
        bytes: usize,
        tokenize: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TokenizeError> {
        let large = if bytes > LARGE_PROMPT_BYTES {
            Some(
                self.large
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| TokenizeError::Interrupted)?,
            )
        } else {
            None
        };
        let room = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TokenizeError::Interrupted)?;
        let (reply, answer) = oneshot::channel();
        let task: Task = Box::new(move || {
            let _slots = (room, large);
            let _ = reply.send(tokenize());
        });
        // The semaphore keeps the channel from ever being full, so this
        // does not block; it fails only if every thread is gone.
        self.tasks
            .try_send(task)
            .map_err(|_| TokenizeError::Interrupted)?;
        answer.await.map_err(|_| TokenizeError::Interrupted)
    }
}

impl crate::error::Classified for TokenizeError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Internal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokenization_runs_off_the_runtime() {
        let pool = TokenizePool::new(2);
        let name = pool
            .run(10, || std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.is_some_and(|n| n.starts_with("tokenize-")));
    }

    #[tokio::test]
    async fn a_large_prompt_leaves_a_thread_for_short_ones() {
        let pool = TokenizePool::new(2);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        // One large tokenization occupies a thread until released; a second
        // large one waits for it, while a short one still runs.
        let first = {
            let (pool, held) = (pool.clone(), held.clone());
            tokio::spawn(async move {
                pool.run(LARGE_PROMPT_BYTES + 1, move || {
                    let _ = held.lock().unwrap().recv();
                })
                .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let second = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(LARGE_PROMPT_BYTES + 1, || 2).await })
        };
        assert_eq!(pool.run(10, || 1).await.unwrap(), 1);
        assert!(!second.is_finished());
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(second.await.unwrap().unwrap(), 2);
    }
}
