//! The `switchyard` binary: command line → logging → configuration → bind →
//! `server::run`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::config::{Config, ConfigError, ConfigSource};
use switchyard::{Gateway, server};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchyard", version, about)]
struct Cli {
    /// Configuration file [default: ./gateway.toml if present, else built-in defaults]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Listen address, overriding the file and SERVICE_PORT
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration, print it with every default filled in and
    /// the figures derived from it; exit 0 if valid, 1 if not
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, source) = match load(&cli) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        print!("{}", config.report(&source));
        return ExitCode::SUCCESS;
    }
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, source))
}

fn load(cli: &Cli) -> Result<(Config, ConfigSource), ConfigError> {
    let (mut config, source) = Config::read(cli.config.as_deref())?;
    config.apply_env(|var| std::env::var(var).ok())?;
    if let Some(listen) = cli.listen {
        config.gateway.listen = listen;
    }
    config.validate()?;
    Ok((config, source))
}

fn init_logging() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            EnvFilter::try_new(&directives).unwrap_or_else(|e| {
                eprintln!("switchyard: ignoring RUST_LOG={directives:?} ({e}); logging at info");
                EnvFilter::new("info")
            })
        }
        _ => EnvFilter::new("info"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn serve(config: Config, source: ConfigSource) -> ExitCode {
    let addr = config.gateway.listen;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen (gateway.listen)");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    if !local.ip().is_loopback() && config.gateway.admin_token.is_empty() {
        tracing::warn!(
            %local,
            "listening beyond loopback without an admin token: anyone who can reach this \
             address can change the registry; set gateway.admin_token or SWITCHYARD_ADMIN_TOKEN"
        );
    }
    let name = config.gateway.name.clone();
    let gateway = match Gateway::new(config) {
        Ok(gateway) => gateway,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the static services");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %local, %name, config = %source, "switchyard listening");
    server::run(listener, gateway, shutdown_signal()).await;
    ExitCode::SUCCESS
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("signal received");
}
