//! `ascend-gateway`: the server and its operator tools. Thin: parses the
//! command line, loads [`Settings`], and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ascend_gateway::app::{App, shutdown_signal};
use ascend_gateway::bench::{self, BenchCommand};
use ascend_gateway::config::{FlagOverrides, LogFormat, Settings};
use ascend_gateway::store::Db;
use ascend_gateway::telemetry;
use clap::{Args, Parser, Subcommand};

// Many small allocations cross threads on every request (gRPC frames, jobs,
// events); mimalloc's thread-local free lists suit that better than glibc's
// arenas, which showed as lock contention in the overhead profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration or usage error (as clap uses for bad flags).
const EXIT_USAGE: u8 = 2;
/// Exit code for a start-up failure outside the configuration's control.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "ascend-gateway",
    version,
    about = "Multi-tenant gRPC inference gateway on emulated Ascend NPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC gateway until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Apply pending database migrations, then exit.
    Migrate(CommonArgs),
    /// Print the effective configuration (secrets hidden), then exit.
    Config(ServeArgs),
    /// Create or run a model directory locally (no server).
    #[command(subcommand)]
    Model(ModelCommand),
    /// Load-test a gateway over gRPC (one it starts in-process, or a
    /// running one) and report throughput and latency.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Bf16,
    F16,
    Int8,
    Fp8,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a complete model directory (config.json, model.safetensors,
    /// tokenizer.json) with seeded random weights, on a trained BPE
    /// vocabulary or a given tokenizer.
    Init {
        #[arg(long, value_parser = ["tiny", "small", "v4-small"], default_value = "small")]
        preset: String,
        /// Build on this tokenizer: `deepseek-v4` (compiled in) or a
        /// directory with a Hugging Face tokenizer.json; the embedding and
        /// output sizes follow its vocabulary
        #[arg(long, value_name = "DIR|deepseek-v4")]
        tokenizer: Option<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Storage format of the linear weights
        #[arg(long, value_enum, default_value = "bf16")]
        format: FormatArg,
    },
    /// Generate from a prompt on one emulated device and print the text, the
    /// usage and the per-operator profile.
    Generate {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0 is greedy
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Device profile: a builtin name or a TOML file
        #[arg(long, default_value = "ascend-910b")]
        device: String,
        /// Also write a Chrome trace (opens in Perfetto)
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
    },
}

#[derive(Args)]
struct CommonArgs {
    /// TOML configuration file
    #[arg(long, value_name = "FILE", env = "ASCEND_CONFIG")]
    config: Option<PathBuf>,
    /// postgres://… or sqlite://…; default: SQLite under the data dir [env: DATABASE_URL, ASCEND_DATABASE_URL]
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Directory for the embedded database and local state [env: ASCEND_DATA_DIR] [default: data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log format [env: ASCEND_LOG_FORMAT] [default: human]
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on [env: ASCEND_LISTEN] [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// redis://… for limits shared across replicas [env: REDIS_URL, ASCEND_REDIS_URL]
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
}

impl ServeArgs {
    fn overrides(&self) -> FlagOverrides {
        FlagOverrides {
            listen: self.listen,
            redis_url: self.redis_url.clone(),
            ..self.common.overrides()
        }
    }
}

impl CommonArgs {
    fn overrides(&self) -> FlagOverrides {
        FlagOverrides {
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            log_format: self.log_format,
            ..FlagOverrides::default()
        }
    }

    fn config_file(&self) -> Option<PathBuf> {
        self.config.clone()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (file, flags) = match &cli.command {
        Command::Serve(args) | Command::Config(args) => {
            (args.common.config_file(), args.overrides())
        }
        Command::Migrate(args) => (args.config_file(), args.overrides()),
        Command::Bench(command) => return bench_command(command),
        Command::Model(command) => {
            return match model_command(command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}", ascend_gateway::error::one_line(e.as_ref()));
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
    };
    let settings = match Settings::load(file.as_deref(), &flags) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Command::Config(_) = cli.command {
        return match toml::to_string_pretty(&settings) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot print the configuration: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let traces = match ascend_gateway::traces::Pipeline::start(&settings.otel, runtime.handle()) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: setting `otel`: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    telemetry::init(&settings.log, traces.as_ref());
    if let Some(traces) = &traces {
        tracing::info!(export = %traces.describe(), "exporting traces");
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(_) => serve(settings).await,
            Command::Migrate(_) => migrate(settings).await,
            Command::Config(_) | Command::Model(_) | Command::Bench(_) => Ok(()),
        }
    });
    // Off the runtime's threads, so the exports it waits for can run there.
    if let Some(traces) = traces {
        traces.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ascend_gateway::error::one_line(e.as_ref()));
            let configuration = e
                .downcast_ref::<ascend_gateway::app::StartupError>()
                .is_some_and(ascend_gateway::app::StartupError::is_configuration);
            ExitCode::from(if configuration {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            })
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = App::build(settings).await?;
    app.run_until(shutdown_signal())
        .await
        .context("serving stopped with an error")
}

/// Runs a bench command; the report goes to stdout, progress to stderr.
fn bench_command(command: &BenchCommand) -> ExitCode {
    telemetry::init(&ascend_gateway::config::LogSettings::for_bench(), None);
    let invocation = std::env::args().collect::<Vec<_>>().join(" ");
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                match command {
                    BenchCommand::Run(args) => {
                        let report = bench::run_command(args).await?;
                        println!("{}", bench::RunReport::markdown_header());
                        println!("{}", report.markdown_row());
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    }
                    BenchCommand::Serving(args) => {
                        print!("{}", bench::serving_suite(args, &invocation).await?);
                    }
                    BenchCommand::Report(args) => {
                        print!("{}", bench::device_report(args, &invocation).await?.1);
                    }
                    BenchCommand::Replot(args) => {
                        for results in &args.results {
                            let kind = bench::replot(results)?;
                            println!("{}: {kind} plots redrawn", results.display());
                        }
                    }
                    BenchCommand::Offline(args) => {
                        print!("{}", bench::offline_scenario(args, &invocation).await?.1);
                    }
                    BenchCommand::Server(args) => {
                        print!("{}", bench::server_scenario(args, &invocation).await?.1);
                    }
                    BenchCommand::Tenants(args) => {
                        print!("{}", bench::tenants_scenario(args, &invocation).await?.1);
                    }
                    BenchCommand::Overhead(args) => {
                        print!("{}", bench::overhead_suite(args, &invocation).await?.1);
                    }
                    BenchCommand::Replicas(args) => {
                        print!("{}", bench::replicas_suite(args, &invocation).await?.1);
                    }
                    BenchCommand::Chat(args) => {
                        print!("{}", bench::chat_scenario(args, &invocation).await?.1);
                    }
                }
                anyhow::Ok(())
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ascend_gateway::error::one_line(e.as_ref()));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    let db = Db::connect(&settings).await?;
    let report = db.migrate().await?;
    println!(
        "{}: {} migration(s) applied now, {} in total",
        db.display_url(),
        report.applied_now,
        report.total
    );
    db.close().await;
    Ok(())
}

fn model_command(command: &ModelCommand) -> anyhow::Result<()> {
    use ascend_gateway::model::init::{InitOptions, init_model_dir_with};
    use ascend_gateway::model::kv_cache::{KvPool, KvPoolOptions};
    use ascend_gateway::model::sampling::SamplingParams;
    use ascend_gateway::model::tokenizer::Tokenizer;
    use ascend_gateway::model::transformer::{LoadOptions, Model};
    use ascend_gateway::model::{GenerateRequest, Preset, generate};
    use ascend_gateway::npu::{Device, WeightFormat};

    match command {
        ModelCommand::Init {
            preset,
            tokenizer,
            seed,
            out,
            format,
        } => {
            let preset: Preset = preset.parse()?;
            let weight_format = match format {
                FormatArg::Bf16 => WeightFormat::Bf16,
                FormatArg::F16 => WeightFormat::F16,
                FormatArg::Int8 => WeightFormat::Int8,
                FormatArg::Fp8 => WeightFormat::Fp8E4m3,
            };
            let options = InitOptions {
                weight_format,
                tokenizer: tokenizer.as_deref().map(str::parse).transpose()?,
                ..InitOptions::default()
            };
            init_model_dir_with(preset, *seed, out, &options)?;
            println!("model directory written to {}", out.display());
            Ok(())
        }
        ModelCommand::Generate {
            dir,
            prompt,
            max_tokens,
            temperature,
            seed,
            device,
            trace,
        } => {
            let model = Model::load(dir, &LoadOptions::default())?;
            let tokenizer = Tokenizer::from_dir(dir)?;
            let profile = ascend_gateway::npu::ProfileSource::parse(device).load()?;
            let mut kv = KvPool::for_device(
                model.config(),
                &profile,
                model.weights().device_bytes(),
                &KvPoolOptions {
                    max_blocks: Some(4096),
                    ..KvPoolOptions::default()
                },
            )?;
            let mut dev = Device::new(profile)?;
            let request = GenerateRequest {
                prompt: tokenizer.encode(prompt, true)?,
                params: SamplingParams {
                    temperature: *temperature,
                    seed: *seed,
                    max_tokens: *max_tokens,
                    ..SamplingParams::default()
                },
            };
            let prompt_tokens = request.prompt.len();
            let started = std::time::Instant::now();
            let results = generate(&model, &mut dev, &mut kv, &tokenizer, &[request])?;
            let wall = started.elapsed();
            let result = results
                .into_iter()
                .next()
                .context("the model returned no result")?;
            println!("{}", result.text);
            println!();
            println!(
                "{} prompt + {} completion tokens, finish {:?}; emulated {} device time {:.1} us, energy {:.3} J; CPU wall {:.1} ms ({:.1} tokens/s)",
                prompt_tokens,
                result.tokens.len(),
                result.finish,
                dev.profile().name,
                result.device_us,
                result.energy_j,
                wall.as_secs_f64() * 1e3,
                result.tokens.len() as f64 / wall.as_secs_f64()
            );
            println!();
            println!("{}", dev.profiler().table());
            if let Some(path) = trace {
                std::fs::write(path, dev.profiler().chrome_trace_json())
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!(
                    "Chrome trace written to {} (open it in Perfetto)",
                    path.display()
                );
            }
            Ok(())
        }
    }
}
