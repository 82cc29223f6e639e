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

mod affinity;
mod echo;
pub mod job;
mod pacing;
pub mod queue;
mod registry;
pub mod stats;
pub mod tokenize;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use affinity::MAX_AFFINITY_WORKERS;
pub use echo::ECHO_DEVICE;
pub use job::{
    Failure, InternalFailure, IsolationKey, Job, JobEvent, JobUsage, Requester, SpendMeter,
};
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
pub type WhenRecorded = Box<dyn FnOnce(Result<(), RecordError>) + Send>;

/// Why a job's usage could not be made durable (the sink's own error).
pub type RecordError = std::sync::Arc<dyn std::error::Error + Send + Sync>;

/// Where finished jobs' usage goes. `record` returns at once; `then` runs
/// when the usage is durable, so a worker never waits on storage and many
/// jobs' usage shares one group commit.
pub trait UsageSink: Send + Sync {
    fn record(
        &self,
        requester: &Requester,
        started_at_us: i64,
        usage: &JobUsage,
        outcome: stats::Outcome,
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
    pub init_preset: Option<crate::model::Preset>,
    pub init_seed: u64,
    pub description: String,
    /// Emulated device of each worker: a builtin profile name or a TOML file.
    pub device_profile: crate::npu::ProfileSource,
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
    /// Keep full KV blocks after their sequence ends and reuse them for prompts that start
    /// with the same tokens in the same cache scope.
    pub prefix_cache: bool,
    /// Share of a worker's KV pool that cached blocks no sequence holds may occupy (they are
    /// evicted, least recently used first, whenever running sequences need the room).
    pub prefix_cache_max_share: f64,
    /// With several workers: a request waits for the worker holding its longest cached
    /// prefix unless that worker's load (sequences running plus requests waiting for it)
    /// exceeds the least loaded worker's by more than this.
    pub cache_affinity_margin: usize,
}

impl ModelSettings {
    /// What makes these settings unusable, checked once at start before any
    /// side effect: the device profile is read (a builtin name or a TOML
    /// file) and the served-as shape checked, so a bad one fails the start
    /// as a configuration error rather than after the database migrated.
    pub fn problem(&self) -> Option<String> {
        if self.workers == 0 || self.max_batch_size == 0 || self.max_batch_tokens == 0 {
            return Some(
                "workers, max_batch_size and max_batch_tokens must be at least 1".to_owned(),
            );
        }
        if !(self.prefix_cache_max_share.is_finite()
            && (0.0..=1.0).contains(&self.prefix_cache_max_share))
        {
            return Some(format!(
                "prefix_cache_max_share must be between 0 and 1 (a share of the KV pool), not {}",
                self.prefix_cache_max_share
            ));
        }
        if self.workers > MAX_AFFINITY_WORKERS {
            return Some(format!(
                "at most {MAX_AFFINITY_WORKERS} workers (emulated devices) per model"
            ));
        }
        if self.engine == Engine::Npu {
            if let Err(e) = self.device_profile.load() {
                return Some(format!("device_profile `{}`: {e}", self.device_profile));
            }
            if let Some(served_as) = &self.served_as
                && let Err(e) = served_as.validate()
            {
                return Some(format!("served_as: {e}"));
            }
        }
        None
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            id: "v4-small".to_owned(),
            dir: None,
            init_preset: Some(crate::model::Preset::V4Small),
            init_seed: 0,
            description: "DeepSeek-style MoE (v4-small executable shape) on DeepSeek V4's \
                          tokenizer, seeded random weights"
                .to_owned(),
            device_profile: crate::npu::ProfileSource::Builtin("ascend-910b".to_owned()),
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
            prefix_cache: true,
            prefix_cache_max_share: 1.0,
            cache_affinity_margin: 8,
        }
    }
}

/// State shared by a model's workers and its submitters.
pub(crate) struct Shared {
    queue: Mutex<queue::FairQueue<Job>>,
    /// Jobs a full queue swept out because their client left or their
    /// deadline passed, for the next worker to end (guarded by `queue`'s
    /// lock order: taken only while holding it).
    swept: Mutex<Vec<(Job, Failure)>>,
    /// Content addresses of prompt blocks, the same in the router and every worker.
    prefix: crate::model::prefix::PrefixHasher,
    /// KV block size of the workers' pools (tokens).
    block_size: usize,
    /// Where cached prefixes are, with more than one worker.
    affinity: Option<affinity::Affinity>,
    work: Condvar,
    stopping: AtomicBool,
    /// A shutdown's grace period ran out: running sequences end now.
    abandoning: AtomicBool,
    /// One per worker.
    gauges: Vec<WorkerGauges>,
    preemptions: AtomicU64,
    stats: stats::ServingStats,
}

/// The queued jobs whose client left or whose deadline passed, each with
/// why ([`Job::gone`]), out of `queue`.
fn take_gone(queue: &mut queue::FairQueue<Job>, now: Instant) -> Vec<(Job, Failure)> {
    queue
        .take_where(|e| e.item.gone(e.deadline, now).is_some())
        .into_iter()
        // Still gone: a closed channel stays closed, a passed deadline passed.
        .filter_map(|e| e.item.gone(e.deadline, now).map(|why| (e.item, why)))
        .collect()
}

/// What one worker last reported of itself.
#[derive(Default)]
struct WorkerGauges {
    running: AtomicUsize,
    deferred: AtomicUsize,
    kv_free: AtomicUsize,
    cached_blocks: AtomicUsize,
}

/// One worker's report of itself.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WorkerReport {
    pub running: usize,
    /// Jobs it took that wait for a prefix being prefilled.
    pub deferred: usize,
    pub kv_free: usize,
    pub cached_blocks: usize,
}

/// A job marked for a worker waits at most this long for it: past it, any worker takes it
/// (the marked one may be unable to admit, its pool full of long sequences).
const AFFINITY_MAX_WAIT: Duration = Duration::from_millis(500);

impl Shared {
    fn new(
        limits: queue::QueueLimits,
        workers: usize,
        prefix: crate::model::prefix::PrefixHasher,
        block_size: usize,
        affinity: Option<affinity::Affinity>,
    ) -> Shared {
        Shared {
            queue: Mutex::new(queue::FairQueue::new(limits)),
            swept: Mutex::new(Vec::new()),
            prefix,
            block_size,
            affinity,
            work: Condvar::new(),
            stopping: AtomicBool::new(false),
            abandoning: AtomicBool::new(false),
            gauges: (0..workers.max(1))
                .map(|_| WorkerGauges::default())
                .collect(),
            preemptions: AtomicU64::new(0),
            stats: stats::ServingStats::default(),
        }
    }

    /// Each worker's load for routing: sequences it runs, jobs it set aside, and queued jobs
    /// marked for it.
    fn loads(&self, queue: &queue::FairQueue<Job>) -> Vec<usize> {
        let mut loads: Vec<usize> = self
            .gauges
            .iter()
            .map(|g| g.running.load(Ordering::Relaxed) + g.deferred.load(Ordering::Relaxed))
            .collect();
        for job in queue.items() {
            if let Some(slot) = job.preferred_worker.and_then(|w| loads.get_mut(w)) {
                *slot += 1;
            }
        }
        loads
    }

    /// Marks `job` for the worker holding its longest cached prefix, if the affinity rule
    /// says it should wait for it, and queues it.
    fn enqueue(
        &self,
        mut job: Job,
        weight: u32,
        priority: queue::Priority,
        deadline: Option<Instant>,
    ) -> Result<(), Box<(QueueFull, Job)>> {
        let cost = job.prompt.len() as u64 + job.params.max_tokens as u64;
        let tenant = job.requester.tenant_id.clone();
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the queue's lock, which `take_all` takes after the
        // flag is set: a job is either refused here or ended by it.
        if self.stopping() {
            return Err(Box::new((QueueFull::ShuttingDown, job)));
        }
        if let Some(affinity) = &self.affinity {
            job.preferred_worker = affinity.prefer(&job.prefix_hashes, &self.loads(&queue));
        }
        let marked = job.preferred_worker.is_some();
        let now = Instant::now();
        let pushed = match queue.push(&tenant, weight, priority, cost, deadline, now, job) {
            // Full: the places of requests whose client left (or whose
            // deadline passed) are freed now, not when a worker gets to them.
            Err((_, job)) => {
                let gone = take_gone(&mut queue, now);
                if !gone.is_empty() {
                    let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
                    swept.extend(gone);
                }
                queue.push(&tenant, weight, priority, cost, deadline, now, job)
            }
            pushed => pushed,
        };
        pushed.map_err(Box::new)?;
        drop(queue);
        if marked {
            // notify_one might wake a worker that leaves the job to another.
            self.work.notify_all();
        } else {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Whether `worker` may take `job` now: unmarked, marked for it, its worker too busy, or
    /// waiting too long (or the model stopping: every job must leave the queue).
    fn may_take(&self, worker: usize, job: &Job, loads: &[usize], now: Instant) -> bool {
        match (&self.affinity, job.preferred_worker) {
            (Some(affinity), Some(preferred)) => {
                affinity.may_take(worker, preferred, loads)
                    || now.saturating_duration_since(job.received_at) >= AFFINITY_MAX_WAIT
                    || self.stopping()
            }
            _ => true,
        }
    }

    /// The next job for `worker` in fair order (leaving jobs that wait for another worker's
    /// cached prefix to it, while the affinity rule allows), and the jobs that left the
    /// queue unserved, each with why (see [`Job::gone`]).
    fn pop(&self, worker: usize, now: Instant) -> (Option<Job>, Vec<(Job, Failure)>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        // Jobs whose client left go too, so they stop holding places.
        let mut expired: Vec<(Job, Failure)> =
            std::mem::take(&mut *self.swept.lock().unwrap_or_else(|e| e.into_inner()));
        expired.extend(take_gone(&mut queue, now));
        let job = if self.affinity.is_some() {
            let loads = self.loads(&queue);
            queue.pop_where(now, |e| self.may_take(worker, &e.item, &loads, now))
        } else {
            queue.pop(now)
        };
        (job.map(|e| e.item), expired)
    }

    /// Waits until work may be there for `worker`: at most `timeout` with an empty queue,
    /// and briefly when every queued job waits for another worker (loads change without a
    /// notification, and with them what this worker may take).
    fn wait_for_work(&self, worker: usize, timeout: Duration) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if self.stopping() {
            return;
        }
        if queue.is_empty() {
            let _ = self.work.wait_timeout(queue, timeout);
            return;
        }
        let loads = self.loads(&queue);
        let now = Instant::now();
        if !queue
            .items()
            .any(|job| self.may_take(worker, job, &loads, now))
        {
            let _ = self
                .work
                .wait_timeout(queue, timeout.min(Duration::from_millis(5)));
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn abandoning(&self) -> bool {
        self.abandoning.load(Ordering::Acquire)
    }

    /// Every job still queued or swept aside, for a stopped model to end.
    fn take_all(&self) -> Vec<Job> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut jobs: Vec<Job> = queue
            .take_where(|_| true)
            .into_iter()
            .map(|e| e.item)
            .collect();
        let swept = std::mem::take(&mut *self.swept.lock().unwrap_or_else(|e| e.into_inner()));
        jobs.extend(swept.into_iter().map(|(job, _)| job));
        jobs
    }

    /// What worker `worker` runs and holds now.
    fn report(&self, worker: usize, report: WorkerReport) {
        if let Some(g) = self.gauges.get(worker) {
            g.running.store(report.running, Ordering::Relaxed);
            g.deferred.store(report.deferred, Ordering::Relaxed);
            g.kv_free.store(report.kv_free, Ordering::Relaxed);
            g.cached_blocks
                .store(report.cached_blocks, Ordering::Relaxed);
        }
    }

    fn sum(&self, gauge: impl Fn(&WorkerGauges) -> &AtomicUsize) -> usize {
        self.gauges
            .iter()
            .map(|g| gauge(g).load(Ordering::Relaxed))
            .sum()
    }

    fn count_preemption(&self) {
        self.preemptions.fetch_add(1, Ordering::Relaxed);
    }
}
