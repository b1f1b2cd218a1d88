//! `restic-agent`: the restic-operator node agent (`serve`), the same binary as a mover pod
//! (`serve --mover-volume`), the on-call debug CLI (`debug`), and the sandbox restic runs in
//! (`sandbox`, started by the agent itself).

mod cgroup;
mod debug;
mod exec;
mod metrics;
mod ops;
mod restic;
mod runs;
mod sandbox;
mod serve;
mod server;
mod volumes;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "restic-agent", version, about = "restic-operator node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the agent's gRPC API (node agent, or a mover with --mover-volume).
    Serve(Box<serve::Args>),
    /// Talk to an agent: health, runs, attach, cancel, volumes, snapshots, dry-run backup.
    Debug(Box<debug::Args>),
    /// Internal: run restic in a private mount namespace (started by the agent).
    #[command(hide = true)]
    Sandbox { spec: String },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        // Before any thread exists: unshare and chroot act on this process alone.
        Command::Sandbox { spec } => match sandbox::enter(&spec) {
            Ok(never) => match never {},
            Err(e) => {
                eprintln!("restic-agent sandbox: {e:#}");
                std::process::exit(125);
            }
        },
        Command::Serve(args) => runtime()?.block_on(serve::run(*args)),
        Command::Debug(args) => runtime()?.block_on(debug::run(*args)),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
