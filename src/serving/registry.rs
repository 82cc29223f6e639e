//! The served models: each loaded once from its directory (created with
//! `model init` on first start when so configured), shared by its workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::affinity::Affinity;
use super::echo::{ECHO_DEVICE, EchoWorker};
use super::queue::{Priority, QueueFull, QueueLimits};
use super::worker::{Worker, WorkerConfig};
use super::{Engine, Job, ModelSettings, Shared, UsageSink};
use crate::error::{Classified, ErrorKind};
use crate::model::ModelError;
use crate::model::config::ModelConfig;
use crate::model::kv_cache::{KvPool, KvPoolOptions};
use crate::model::prefix::PrefixHasher;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{LoadOptions, Model};
use crate::npu::{Device, DeviceProfile};

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("model `{id}` (setting `models`): {source}")]
    Model { id: String, source: ModelError },
    #[error("model `{id}`: device profile `{profile}`: {source}")]
    Device {
        id: String,
        profile: String,
        source: crate::npu::NpuError,
    },
    #[error("model `{id}`: directory {dir} has no config.json and no `init_preset` to create it")]
    MissingDir { id: String, dir: PathBuf },
    #[error("model `{id}`: cannot start a worker thread: {source}")]
    Thread { id: String, source: std::io::Error },
    #[error("unknown model `{0}`; ListModels shows the served ones")]
    UnknownModel(String),
    #[error(transparent)]
    QueueFull(#[from] QueueFull),
}

impl Classified for ServingError {
    fn kind(&self) -> ErrorKind {
        match self {
            ServingError::UnknownModel(_) => ErrorKind::NotFound,
            ServingError::QueueFull(QueueFull::ShuttingDown) => ErrorKind::Unavailable,
            ServingError::QueueFull(_) => ErrorKind::ResourceExhausted,
            _ => ErrorKind::Internal,
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        self.queue_full().then(|| std::time::Duration::from_secs(1))
    }

    fn quota_violation(&self) -> Option<(&'static str, String)> {
        self.queue_full().then(|| ("model_queue", self.to_string()))
    }
}

impl ServingError {
    /// Refused by a full queue (not by a stopping model).
    fn queue_full(&self) -> bool {
        matches!(self, ServingError::QueueFull(full) if *full != QueueFull::ShuttingDown)
    }
}

/// One model being served by its pool of workers.
pub struct ServedModel {
    pub settings: ModelSettings,
    /// The executable model; `None` for the echo engine.
    pub model: Option<Arc<Model>>,
    /// Longest prompt + completion, in tokens.
    pub context_length: usize,
    pub tokenizer: Arc<Tokenizer>,
    pub device_profile: String,
    shared: Arc<Shared>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Where jobs left in the queue at stop are recorded.
    usage: Arc<dyn UsageSink>,
}

type WorkerThread = std::thread::JoinHandle<()>;

/// Starts one worker of model `id` on its own named OS thread.
fn spawn_worker(
    id: &str,
    name: String,
    run: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, ServingError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(run)
        .map_err(|source| ServingError::Thread {
            id: id.to_owned(),
            source,
        })
}

fn profile(settings: &ModelSettings) -> Result<DeviceProfile, ServingError> {
    settings
        .device_profile
        .load()
        .map_err(|e| ServingError::Device {
            id: settings.id.clone(),
            profile: settings.device_profile.to_string(),
            source: e,
        })
}

/// The model's directory, created from its `init_preset` when it has no
/// config.json yet.
fn model_dir(settings: &ModelSettings, data_dir: &Path) -> Result<PathBuf, ServingError> {
    let id = &settings.id;
    let dir = settings
        .dir
        .clone()
        .unwrap_or_else(|| data_dir.join("models").join(id));
    if !dir.join("config.json").exists() {
        let Some(preset) = settings.init_preset else {
            return Err(ServingError::MissingDir {
                id: id.clone(),
                dir,
            });
        };
        tracing::info!(model = %id, dir = %dir.display(), ?preset, "creating the model directory");
        crate::model::init::init_model_dir(preset, settings.init_seed, &dir).map_err(|source| {
            ServingError::Model {
                id: id.clone(),
                source,
            }
        })?;
    }
    Ok(dir)
}

/// The queue and the workers' reports, shared by the model's workers.
fn shared_state(settings: &ModelSettings, workers: usize, caching: bool) -> Shared {
    Shared::new(
        QueueLimits {
            max_requests: settings.max_queue_requests,
            max_tokens: settings.max_queue_tokens,
            aging_step: settings.aging_step,
        },
        workers,
        PrefixHasher::new(&settings.id),
        KvPoolOptions::default().block_size,
        (caching && workers > 1).then(|| Affinity::new(workers, settings.cache_affinity_margin)),
    )
}

/// What a model needs to start its workers.
struct Start<'a> {
    settings: &'a ModelSettings,
    tokenizer: &'a Arc<Tokenizer>,
    shared: &'a Arc<Shared>,
    usage: &'a Arc<dyn UsageSink>,
    workers: usize,
}

impl Start<'_> {
    fn model_error(&self, source: ModelError) -> ServingError {
        ServingError::Model {
            id: self.settings.id.clone(),
            source,
        }
    }

    fn device_error(&self, source: crate::npu::NpuError) -> ServingError {
        ServingError::Device {
            id: self.settings.id.clone(),
            profile: self.settings.device_profile.to_string(),
            source,
        }
    }

    fn echo_workers(&self) -> Result<Vec<WorkerThread>, ServingError> {
        let id = &self.settings.id;
        (0..self.workers)
            .map(|n| {
                let worker = EchoWorker {
                    tokenizer: self.tokenizer.clone(),
                    shared: self.shared.clone(),
                    usage: self.usage.clone(),
                };
                spawn_worker(id, format!("echo-{id}-{n}"), move || worker.run())
            })
            .collect()
    }

    /// Loads the model once and starts one emulated device per worker.
    fn npu_workers(
        &self,
        dir: &Path,
    ) -> Result<(Arc<Model>, DeviceProfile, Vec<WorkerThread>), ServingError> {
        let settings = self.settings;
        let model =
            Arc::new(Model::load(dir, &LoadOptions::default()).map_err(|e| self.model_error(e))?);
        if let Some(served_as) = &settings.served_as {
            served_as.validate().map_err(|e| self.model_error(e))?;
        }
        let profile = profile(settings)?;
        let threads = (0..self.workers)
            .map(|n| {
                let worker = self.npu_worker(n, &model, &profile)?;
                spawn_worker(
                    &settings.id,
                    format!("npu-{}-{n}", settings.id),
                    move || worker.run(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok((model, profile, threads))
    }

    /// Worker `n`: its device, its KV pool sized to the device's memory.
    fn npu_worker(
        &self,
        n: usize,
        model: &Arc<Model>,
        profile: &DeviceProfile,
    ) -> Result<Worker, ServingError> {
        let settings = self.settings;
        let device = Device::new(profile.clone()).map_err(|e| self.device_error(e))?;
        let caching = settings.prefix_cache;
        let kv_options = KvPoolOptions {
            max_blocks: settings.kv_max_blocks,
            prefix_cache_share: if caching {
                settings.prefix_cache_max_share
            } else {
                0.0
            },
            ..KvPoolOptions::default()
        };
        let mut kv = KvPool::for_device(
            model.config(),
            device.profile(),
            model.weights().device_bytes(),
            &kv_options,
        )
        .map_err(|e| self.model_error(e))?;
        if self.shared.affinity.is_some() {
            kv.track_cache_changes();
        }
        self.shared.report(
            n,
            super::WorkerReport {
                kv_free: kv.free_blocks(),
                ..Default::default()
            },
        );
        Ok(Worker {
            model: model.clone(),
            tokenizer: self.tokenizer.clone(),
            device,
            kv,
            config: WorkerConfig {
                index: n,
                max_batch_size: settings.max_batch_size.max(1),
                max_batch_tokens: settings.max_batch_tokens.max(1),
                pace: settings.pace,
                batching: settings.batching,
                served_as: settings.served_as.clone(),
            },
            shared: self.shared.clone(),
            usage: self.usage.clone(),
            stalled: false,
            evictions_counted: 0,
            steps: 0,
            deferred: std::collections::VecDeque::new(),
            pacing: Default::default(),
            model_id: settings.id.clone(),
        })
    }
}

impl ServedModel {
    /// Loads the model (creating its directory first if configured to) and
    /// starts its workers.
    pub fn start(
        settings: ModelSettings,
        data_dir: &Path,
        usage: Arc<dyn UsageSink>,
    ) -> Result<ServedModel, ServingError> {
        let model_error = |source| ServingError::Model {
            id: settings.id.clone(),
            source,
        };
        let dir = model_dir(&settings, data_dir)?;
        let tokenizer = Arc::new(Tokenizer::from_dir(&dir).map_err(model_error)?);
        let config = ModelConfig::from_file(&dir.join("config.json")).map_err(model_error)?;
        tokenizer
            .check_fits(config.vocab_size)
            .map_err(model_error)?;
        let workers = settings.workers.max(1);
        let caching = settings.prefix_cache && settings.engine == Engine::Npu;
        let shared = Arc::new(shared_state(&settings, workers, caching));
        let start = Start {
            settings: &settings,
            tokenizer: &tokenizer,
            shared: &shared,
            usage: &usage,
            workers,
        };
        let (model, device_profile, context_length, threads) = match settings.engine {
            Engine::Echo => (
                None,
                ECHO_DEVICE.to_owned(),
                config.max_position_embeddings,
                start.echo_workers()?,
            ),
            Engine::Npu => {
                let (model, profile, threads) = start.npu_workers(&dir)?;
                let context_length = model.config().max_position_embeddings;
                (Some(model), profile.name, context_length, threads)
            }
        };
        Ok(ServedModel {
            device_profile,
            context_length,
            settings,
            model,
            tokenizer,
            shared,
            threads: std::sync::Mutex::new(threads),
            usage,
        })
    }

    /// Queues a job, or refuses it at once when the queue is full. With prefix caching on,
    /// the prompt's block addresses are computed here, once, for routing and for the worker.
    pub fn submit(&self, mut job: Job, priority: Priority) -> Result<(), Box<(QueueFull, Job)>> {
        if self.caches_prefixes() {
            job.prefix_hashes = self.shared.prefix.chain(
                job.isolation.as_str(),
                &job.prompt,
                self.shared.block_size,
            );
        }
        let weight = job.requester.weight;
        let deadline = Some(
            job.deadline
                .unwrap_or(job.received_at + self.settings.max_queue_time)
                .min(job.received_at + self.settings.max_queue_time),
        );
        self.shared
            .enqueue(job, weight, priority, deadline)
            .inspect_err(|_| {
                self.shared
                    .stats
                    .queue_full_rejections
                    .fetch_add(1, Ordering::Relaxed);
            })
    }

    /// Whether this model's workers reuse cached prompt prefixes.
    pub fn caches_prefixes(&self) -> bool {
        self.settings.prefix_cache && self.model.is_some()
    }

    /// Requests waiting and their tokens.
    pub fn queue_depth(&self) -> (usize, u64) {
        let queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        (queue.len(), queue.queued_tokens())
    }

    /// Free KV blocks as last reported by the workers.
    pub fn kv_free_blocks(&self) -> usize {
        self.shared.sum(|g| &g.kv_free)
    }

    /// KV blocks holding a cached prefix (held by a sequence or retained), over the workers.
    pub fn cached_blocks(&self) -> usize {
        self.shared.sum(|g| &g.cached_blocks)
    }

    /// Sequences in the workers' batches.
    pub fn running(&self) -> usize {
        self.shared.sum(|g| &g.running)
    }

    pub fn preemptions(&self) -> u64 {
        self.shared.preemptions.load(Ordering::Relaxed)
    }

    /// Latency histograms and counters of this model's workers.
    pub fn stats(&self) -> &super::stats::ServingStats {
        &self.shared.stats
    }

    /// Stops the workers once their running jobs end; blocks.
    /// Ends every running sequence at the workers' next step, as if its
    /// client had left (usage recorded, permit settled): a shutdown whose
    /// grace period ran out does not wait for long generations.
    pub fn abandon_running(&self) {
        self.shared.abandoning.store(true, Ordering::Release);
        self.shared.work.notify_all();
    }

    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.work.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        // No worker takes anything now, and the queue refuses new jobs:
        // what is still in it (queued between a worker's last look and its
        // end) is ended here, its usage recorded and its permit settled.
        let now = std::time::Instant::now();
        for job in self.shared.take_all() {
            let usage = super::JobUsage {
                prompt_tokens: u32::try_from(job.prompt.len()).unwrap_or(u32::MAX),
                queue_time_us: super::worker::micros(
                    now.saturating_duration_since(job.received_at),
                ),
                total_time_us: super::worker::micros(
                    now.saturating_duration_since(job.received_at),
                ),
                device_profile: self.device_profile.clone(),
                ..Default::default()
            };
            super::worker::finish_job(
                &self.shared,
                self.usage.as_ref(),
                job,
                Err(super::Failure::Cancelled),
                usage,
            );
        }
    }
}

/// Every served model by id.
#[derive(Default, Clone)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<ServedModel>>,
}

impl ModelRegistry {
    pub fn start(
        settings: &[ModelSettings],
        data_dir: &Path,
        usage: Arc<dyn UsageSink>,
    ) -> Result<ModelRegistry, ServingError> {
        let mut models = BTreeMap::new();
        for model in settings {
            let served = ServedModel::start(model.clone(), data_dir, usage.clone())?;
            models.insert(model.id.clone(), Arc::new(served));
        }
        Ok(ModelRegistry { models })
    }

    pub fn get(&self, id: &str) -> Result<&Arc<ServedModel>, ServingError> {
        self.models
            .get(id)
            .ok_or_else(|| ServingError::UnknownModel(id.to_owned()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.models.values()
    }

    pub fn stop(&self) {
        for model in self.models.values() {
            model.stop();
        }
    }

    /// [`ServedModel::abandon_running`] for every model.
    pub fn abandon_running(&self) {
        for model in self.models.values() {
            model.abandon_running();
        }
    }
}
