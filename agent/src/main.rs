//! `restic-agent`: the restic-operator node agent (`serve`), the on-call debug CLI (`debug`),
//! and the sandbox restic runs in (`sandbox`, started by the agent itself).

mod cache;
mod cgroup;
mod debug;
mod exec;
mod locks;
mod metrics;
mod oncall;
mod ops;
mod parents;
mod restic;
mod runs;
mod sandbox;
mod serve;
mod server;
mod tls;
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
    /// Serve the agent's gRPC API on this node.
    Serve(Box<serve::Args>),
    /// Talk to an agent: health, runs, attach, cancel, volumes, snapshots, dry-run backup.
    Debug(Box<debug::Args>),
    /// Internal: run restic in its sandbox (started by the agent).
    #[command(hide = true)]
    Sandbox { spec: String },
    /// Internal: the process that builds the sandbox's root and becomes restic.
    #[command(hide = true)]
    SandboxInit { spec: String },
    /// Internal: the sandbox's first process, which holds its PID namespace open.
    #[command(hide = true)]
    SandboxHolder,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        // Before any thread exists: unshare acts on this process alone.
        Command::Sandbox { spec } => sandboxed(sandbox::enter(&spec)),
        Command::SandboxInit { spec } => sandboxed(sandbox::init(&spec)),
        Command::SandboxHolder => sandbox::hold(),
        Command::Serve(args) => runtime()?.block_on(serve::run(*args)),
        Command::Debug(args) => runtime()?.block_on(debug::run(*args)),
    }
}

/// Reports why the sandbox could not become restic, with an exit code that tells a refused
/// request from a setup failure.
fn sandboxed(result: anyhow::Result<std::convert::Infallible>) -> ! {
    let Err(e) = result;
    eprintln!("restic-agent sandbox: {e:#}");
    let code = match e.downcast_ref::<sandbox::Refused>() {
        Some(_) => sandbox::EXIT_REFUSED,
        None => sandbox::EXIT_SETUP,
    };
    std::process::exit(code)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
