//! `keel`: the Keel server. With no flags, a single-node cluster on 127.0.0.1 with its data in
//! `./keel-data`; `keel cluster --nodes 3` starts a local cluster of processes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel::cluster::{self, ClusterArgs};
use keel::config::{load_file, resolve, ServeArgs};
use keel::server;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "Keel: a strongly consistent key-value store replicated with Raft",
    args_conflicts_with_subcommands = true,
    after_help = "Logging follows RUST_LOG (default: info)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a local cluster of N keel processes on 127.0.0.1 (Ctrl-C stops them all).
    Cluster(ClusterArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal; log files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.cmd {
        Some(Cmd::Cluster(args)) => rt.block_on(cluster::run(args)),
        None => {
            let plan = cli
                .serve
                .config
                .as_deref()
                .map(load_file)
                .transpose()
                .and_then(|file| resolve(&cli.serve, file.as_ref()));
            match plan {
                Ok(plan) => rt.block_on(server::run(plan)),
                Err(e) => Err(anyhow::anyhow!(e)),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
