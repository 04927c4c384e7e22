//! The `switchyard` binary: command line → configuration → logging → bind →
//! `server::run` on each worker thread.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use switchyard::config::{Config, ConfigError, ConfigSource};
use switchyard::log::Logging;
use switchyard::{Gateway, server};
use tokio_util::sync::CancellationToken;

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
    // Kept to the end of `main`: dropping it writes the lines still queued.
    let logging = match Logging::init(&config.log) {
        Ok(logging) => logging,
        Err(e) => {
            eprintln!("switchyard: cannot set up logging: {e}");
            return ExitCode::FAILURE;
        }
    };
    serve(config, source, &logging)
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

/// Runs the gateway on `gateway.workers` threads, each with its own event
/// loop and listening socket (SO_REUSEPORT): the kernel spreads connections
/// over them, and a request never leaves the thread its connection lives on
/// (each instance keeps one connection pool per worker). The main thread is
/// worker 0 and also owns the signal handling.
fn serve(mut config: Config, source: ConfigSource, logging: &Logging) -> ExitCode {
    if config.gateway.workers == 0 {
        config.gateway.workers = default_workers();
    }
    let workers = config.gateway.workers;
    let main = match worker_runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let addr = config.gateway.listen;
    // Claiming first makes a port someone else listens on an error (SO_REUSEPORT
    // alone would share it) and turns port 0 into the port every worker binds.
    let listening = server::claim(addr).and_then(|local| {
        let listener = main.block_on(async { server::bind(local) })?;
        Ok((listener, local))
    });
    let (listener, local) = match listening {
        Ok(listening) => listening,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen (gateway.listen)");
            return ExitCode::FAILURE;
        }
    };
    if !local.ip().is_loopback() && config.gateway.admin_token.is_empty() {
        tracing::warn!(
            %local,
            "listening beyond loopback without an admin token: anyone who can reach this \
             address can change the registry; set gateway.admin_token or SWITCHYARD_ADMIN_TOKEN"
        );
    }
    // The upstream policy refuses the gateway's own address: the real one.
    config.gateway.listen = local;
    let name = config.gateway.name.clone();
    let access = logging.access_switch().clone();
    let gateway = match main.block_on(Gateway::with_access_switch(config, access)) {
        Ok(gateway) => gateway,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the registry");
            eprintln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signal = match main.block_on(async { shutdown_signal() }) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    let threads: Vec<_> = (1..workers)
        .filter_map(|index| spawn_worker(index, local, &gateway, &stop))
        .collect();
    tracing::info!(
        addr = %local,
        %name,
        workers = threads.len() + 1,
        batched_writes = switchyard::write_batch::batch_writes(),
        store = %gateway.registry().store_description(),
        config = %source,
        "switchyard listening"
    );
    main.block_on(server::run(listener, gateway, async move {
        signal.await;
        stop.cancel();
    }));
    for thread in threads {
        let _ = thread.join();
    }
    ExitCode::SUCCESS
}

/// One worker per core. On the 2-core reference machine, shared with the
/// upstreams and the load generator, two workers served about 3% more than
/// one (README, benchmark section); with upstream requests batched per
/// event-loop turn, a single worker became the bottleneck.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Starts worker `index` on its own thread; `None` (logged) if it cannot
/// start, and the gateway runs with the workers it has.
fn spawn_worker(
    index: usize,
    addr: SocketAddr,
    gateway: &Arc<Gateway>,
    stop: &CancellationToken,
) -> Option<std::thread::JoinHandle<()>> {
    let started = worker_runtime().and_then(|runtime| {
        let listener = runtime.block_on(async { server::bind(addr) })?;
        Ok((runtime, listener))
    });
    let (runtime, listener) = started
        .map_err(|e| tracing::warn!(worker = index, error = %e, "worker not started"))
        .ok()?;
    let (gateway, stop) = (gateway.clone(), stop.clone());
    std::thread::Builder::new()
        .name(format!("switchyard-{index}"))
        .spawn(move || {
            switchyard::upstream::set_worker(index);
            runtime.block_on(server::run(listener, gateway, stop.cancelled_owned()));
        })
        .map_err(|e| tracing::warn!(worker = index, error = %e, "worker not started"))
        .ok()
}

/// SIGINT and SIGTERM, caught from the moment this is made: installed
/// before the gateway says it is listening, so a signal sent right after
/// that line is never fatal.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("signal received");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("signal received");
    })
}
