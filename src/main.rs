//! The `switchyard` binary: command line → configuration → logging → bind →
//! `server::run` on each worker thread; SIGHUP reloads the configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use switchyard::config::{Config, ConfigError, ConfigSource};
use switchyard::log::{LogControl, Logging};
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
    serve(config, source, cli.listen, &logging)
}

fn load(cli: &Cli) -> Result<(Config, ConfigSource), ConfigError> {
    load_from(cli.config.as_deref(), cli.listen)
}

/// Reads `file` (or `./gateway.toml` if present, or the defaults), applies
/// the environment and `listen`, and validates.
fn load_from(
    file: Option<&Path>,
    listen: Option<SocketAddr>,
) -> Result<(Config, ConfigSource), ConfigError> {
    let (mut config, source) = Config::read(file)?;
    config.apply_env(|var| std::env::var(var).ok())?;
    if let Some(listen) = listen {
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
fn serve(
    mut config: Config,
    source: ConfigSource,
    listen: Option<SocketAddr>,
    logging: &Logging,
) -> ExitCode {
    #[cfg(target_os = "linux")]
    raise_open_files(config.limits.max_connections);
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
    warn_if_unguarded(local, &config);
    let bound = Bound { asked: addr, local };
    bound.settle(&mut config);
    let workers = config.gateway.workers;
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
    let signals =
        main.block_on(async { Ok::<_, std::io::Error>((shutdown_signal()?, reload_signal()?)) });
    let (signal, hangup) = match signals {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let origin = Origin {
        file: match &source {
            ConfigSource::File(path) => Some(path.clone()),
            ConfigSource::Defaults => None,
        },
        listen,
        bound,
    };
    main.spawn(reload_on(
        hangup,
        origin,
        gateway.clone(),
        logging.control().clone(),
    ));
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

/// Raises the open-files limit as far as the hard limit allows, and warns
/// when `limits.max_connections` can still run into it.
#[cfg(target_os = "linux")]
fn raise_open_files(max_connections: u32) {
    use switchyard::server::open_files;
    match open_files::raise() {
        Ok(raised) if raised.to != raised.from => {
            tracing::info!(from = ?raised.from, to = ?raised.to, "open files limit raised");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    open_files::warn_if_short(max_connections);
}

/// Warns when anyone who can reach `local` could change the registry.
fn warn_if_unguarded(local: SocketAddr, config: &Config) {
    if !local.ip().is_loopback() && config.gateway.admin_token.is_empty() {
        tracing::warn!(
            %local,
            "listening beyond loopback without an admin token: anyone who can reach this \
             address can change the registry; set gateway.admin_token or SWITCHYARD_ADMIN_TOKEN"
        );
    }
}

/// How the configuration was made at start, to make it again on SIGHUP:
/// the file it came from (a file read at start must still be there), the
/// `--listen` given, and the address bound.
struct Origin {
    file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    bound: Bound,
}

/// Where the gateway was asked to listen and where it does.
#[derive(Clone, Copy)]
struct Bound {
    asked: SocketAddr,
    local: SocketAddr,
}

impl Bound {
    /// Resolves what start-up resolved: `workers = 0` is one per core, and
    /// the listen address asked for is the one bound (port 0 became a
    /// real port; the upstream policy refuses the gateway's own address,
    /// the real one). A reloaded file that did not change them compares
    /// equal to the running configuration.
    fn settle(self, config: &mut Config) {
        if config.gateway.workers == 0 {
            config.gateway.workers = default_workers();
        }
        if config.gateway.listen == self.asked {
            config.gateway.listen = self.local;
        }
    }
}

/// Reloads the configuration each time `hangup` fires, for as long as the
/// gateway runs.
async fn reload_on(
    mut hangup: impl Hangup,
    origin: Origin,
    gateway: Arc<Gateway>,
    logging: LogControl,
) {
    while hangup.recv().await {
        reload(&origin, &gateway, &logging).await;
    }
}

/// Reads the configuration again as at start (the same file, environment
/// and `--listen`), applies it, and logs what happened. Every reload ends
/// here, and a successful one with the configuration now in force in hand.
async fn reload(origin: &Origin, gateway: &Gateway, logging: &LogControl) {
    let report = match load_from(origin.file.as_deref(), origin.listen) {
        Ok((mut config, source)) => {
            tracing::info!(config = %source, "reloading the configuration");
            origin.bound.settle(&mut config);
            gateway.reload(config).await
        }
        Err(e) => gateway.reload_failed(e),
    };
    match &report.result {
        Ok(()) => {
            for key in &report.not_applied {
                tracing::warn!(%key, "not applied: needs a restart");
            }
            let config = gateway.config();
            if let Err(error) = logging.apply(&config.log) {
                tracing::error!(%error, "[log] settings not applied");
            }
            warn_if_unguarded(origin.bound.local, &config);
            let changed = match report.applied.is_empty() {
                true => "nothing".to_string(),
                false => report.applied.join(", "),
            };
            tracing::info!(%changed, "configuration reloaded");
        }
        Err(error) => tracing::error!(
            %error,
            "configuration not reloaded: the running configuration stays"
        ),
    }
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

/// A stream of requests to reload; `recv` is false once there are no more.
trait Hangup: Send + 'static {
    fn recv(&mut self) -> impl std::future::Future<Output = bool> + Send;
}

#[cfg(unix)]
impl Hangup for tokio::signal::unix::Signal {
    async fn recv(&mut self) -> bool {
        tokio::signal::unix::Signal::recv(self).await.is_some()
    }
}

/// SIGHUP, caught from the moment this is made, like the shutdown signals.
#[cfg(unix)]
fn reload_signal() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// No SIGHUP here: nothing ever asks for a reload.
#[cfg(not(unix))]
struct NoHangup;

#[cfg(not(unix))]
impl Hangup for NoHangup {
    async fn recv(&mut self) -> bool {
        false
    }
}

#[cfg(not(unix))]
fn reload_signal() -> std::io::Result<NoHangup> {
    Ok(NoHangup)
}
