//! `ascend-gateway`: the server and its operator tools. Thin: parses the
//! command line, loads [`Settings`], and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ascend_gateway::app::{App, shutdown_signal};
use ascend_gateway::config::{FlagOverrides, LogFormat, Settings};
use ascend_gateway::store::Db;
use ascend_gateway::telemetry;
use clap::{Args, Parser, Subcommand};

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
}

#[derive(Args)]
struct CommonArgs {
    /// TOML configuration file [env: ASCEND_CONFIG]
    #[arg(long, value_name = "FILE")]
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
        self.config
            .clone()
            .or_else(|| std::env::var_os("ASCEND_CONFIG").map(PathBuf::from))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (file, flags) = match &cli.command {
        Command::Serve(args) | Command::Config(args) => {
            (args.common.config_file(), args.overrides())
        }
        Command::Migrate(args) => (args.config_file(), args.overrides()),
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
    telemetry::init(&settings.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(_) => serve(settings).await,
            Command::Migrate(_) => migrate(settings).await,
            Command::Config(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ascend_gateway::error::one_line(e.as_ref()));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = App::build(settings).await?;
    app.run_until(shutdown_signal())
        .await
        .context("serving stopped with an error")
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
