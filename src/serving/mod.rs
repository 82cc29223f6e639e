//! Serving: requests from many tenants share a pool of workers per model,
//! each an emulated NPU running the model with continuous batching on its own
//! OS thread, never on the async runtime.
//!
//! [`ServedModel::submit`] puts a tokenized [`Job`] in the model's bounded,
//! tenant-fair [`queue`] (full: refused at once); workers pull from it when
//! they have room in their batch, so a request goes to the first worker with
//! free batch slots: with equal workers this is least-outstanding-work
//! routing, and a worker short of KV blocks preempts and takes fewer. Events
//! (text deltas, then the end with usage) come back on the job's channel.
//! Usage leaves through the one narrow [`UsageSink`]; serving never touches
//! the database or Redis.

mod echo;
pub mod job;
pub mod queue;
mod registry;
pub mod stats;
pub mod tokenize;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use echo::ECHO_DEVICE;
pub use job::{Failure, Job, JobEvent, JobUsage, Requester};
pub use queue::{Priority, QueueFull};
pub use registry::{ModelRegistry, ServedModel, ServingError};

/// How fast steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pace {
    /// As fast as the CPU computes them.
    Cpu,
    /// Each step lasts at least its emulated device time, so clients see the
    /// emulated hardware's latency.
    Device,
}

/// What runs once a job's usage is durable (or failed to become so).
pub type WhenRecorded = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Where finished jobs' usage goes. `record` returns at once; `then` runs
/// when the usage is durable, so a worker never waits on storage and many
/// jobs' usage shares one group commit.
pub trait UsageSink: Send + Sync {
    fn record(
        &self,
        requester: &Requester,
        started_at_us: i64,
        usage: &JobUsage,
        finish_reason: &str,
        then: WhenRecorded,
    );
}

/// What runs a model's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The executable model on emulated NPU workers.
    Npu,
    /// Answers at once with the prompt, computing nothing: for measuring
    /// the gateway's own overhead. Needs only the directory's tokenizer
    /// and config.json.
    Echo,
}

/// How a worker forms its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// Iteration-level: sequences join and leave the batch at every step.
    Continuous,
    /// A batch is formed from what is queued when the worker is idle and
    /// runs until its last sequence ends; kept as the baseline that the
    /// serving benchmark compares continuous batching against.
    Static,
}

/// One served model, as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// The id clients put in `model`.
    pub id: String,
    /// Model directory (config.json, model.safetensors, tokenizer.json);
    /// default `<data_dir>/models/<id>`.
    pub dir: Option<std::path::PathBuf>,
    /// When the directory does not exist, create it with `model init` of
    /// this preset (`tiny` or `small`) and `seed`; unset: a missing
    /// directory is an error.
    pub init_preset: Option<String>,
    pub init_seed: u64,
    pub description: String,
    /// Emulated device of each worker: a builtin profile name or a TOML file.
    pub device_profile: String,
    pub engine: Engine,
    pub workers: usize,
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_output_tokens: u32,
    pub max_queue_requests: usize,
    pub max_queue_tokens: u64,
    /// Longest a request may wait in the queue.
    #[serde(with = "humantime_serde")]
    pub max_queue_time: Duration,
    /// A waiting request rises one priority tier per this much waiting.
    #[serde(with = "humantime_serde")]
    pub aging_step: Duration,
    pub pace: Pace,
    pub batching: Batching,
    /// Cap on KV blocks per worker (host memory of the emulation); unset:
    /// sized from the device's HBM.
    pub kv_max_blocks: Option<usize>,
    /// The full-size shape this small executable model stands for: device
    /// time and energy (hence pacing and metering) are charged for it, by
    /// the scaling rule of `model::served_as`. Unset: the executed shape.
    pub served_as: Option<crate::model::served_as::ServedAs>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            id: "small".to_owned(),
            dir: None,
            init_preset: Some("small".to_owned()),
            init_seed: 0,
            description: "DeepSeek-style MoE (small executable shape), seeded random weights"
                .to_owned(),
            device_profile: "ascend-910b".to_owned(),
            engine: Engine::Npu,
            workers: 1,
            max_batch_size: 32,
            max_batch_tokens: 512,
            max_output_tokens: 256,
            max_queue_requests: 1024,
            max_queue_tokens: 4_000_000,
            max_queue_time: Duration::from_secs(60),
            aging_step: Duration::from_secs(10),
            pace: Pace::Cpu,
            batching: Batching::Continuous,
            kv_max_blocks: Some(4096),
            served_as: None,
        }
    }
}

/// State shared by a model's workers and its submitters.
pub(crate) struct Shared {
    queue: Mutex<queue::FairQueue<Job>>,
    work: Condvar,
    stopping: AtomicBool,
    running: AtomicUsize,
    kv_free: AtomicUsize,
    preemptions: AtomicU64,
    stats: stats::ServingStats,
}

impl Shared {
    fn new(limits: queue::QueueLimits) -> Shared {
        Shared {
            queue: Mutex::new(queue::FairQueue::new(limits)),
            work: Condvar::new(),
            stopping: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            kv_free: AtomicUsize::new(0),
            preemptions: AtomicU64::new(0),
            stats: stats::ServingStats::default(),
        }
    }

    fn pop(&self, now: Instant) -> (Option<Job>, Vec<Job>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let expired = queue
            .take_expired(now)
            .into_iter()
            .map(|e| e.item)
            .collect();
        (queue.pop(now).map(|e| e.item), expired)
    }

    fn wait_for_work(&self, timeout: Duration) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.is_empty() && !self.stopping() {
            let _ = self.work.wait_timeout(queue, timeout);
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn set_running(&self, n: usize) {
        self.running.store(n, Ordering::Relaxed);
    }

    fn set_kv_free(&self, n: usize) {
        self.kv_free.store(n, Ordering::Relaxed);
    }

    fn count_preemption(&self) {
        self.preemptions.fetch_add(1, Ordering::Relaxed);
    }
}
