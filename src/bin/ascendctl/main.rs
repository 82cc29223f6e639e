//! `ascendctl`: the operator's command line for a running gateway. Parses
//! the command line, finds the endpoint and admin token (flag, environment,
//! then the user's config file), calls the gateway over gRPC, and prints a
//! table for people or JSON for scripts.

mod billing;
mod commands;
mod operator;
mod output;
mod settings;
mod tls;
mod webhook;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::commands::{Cli, Command};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "ascendctl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ascend_gateway::error::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
