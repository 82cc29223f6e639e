//! `ascendctl`: the operator's command line for a running gateway. Thin:
//! parses the command line and calls the gateway over gRPC.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[derive(Parser)]
#[command(name = "ascendctl", version, about = "Administer an Ascend Gateway")]
struct Cli {
    /// Gateway address
    #[arg(
        long,
        env = "ASCENDCTL_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ask the gateway whether it is serving.
    Health,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Health => health(&cli.endpoint).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn health(endpoint: &str) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .with_context(|| format!("invalid --endpoint {endpoint:?}; use e.g. http://127.0.0.1:50051"))?
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the gateway at {endpoint}; check that it runs and that --endpoint / ASCENDCTL_ENDPOINT point at it")
        })?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .context("health check failed")?;
    let status = response.into_inner().status();
    println!("{}", status.as_str_name());
    Ok(())
}
