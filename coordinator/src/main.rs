use clap::Parser;
use restic_operator_coordinator::config::Config;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,tower=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    // The controller and run futures are deep; unoptimized builds need more than the default
    // 2 MiB of stack for them.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 << 20)
        .build()?
        .block_on(restic_operator_coordinator::serve::run(config))
}
