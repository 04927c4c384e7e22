//! Where log lines go and in what shape (SPEC §9, `[log]`).
//!
//! Every line goes through one `tracing` subscriber: the `RUST_LOG` filter
//! (`info` when unset), then one formatter, text or JSON as `[log] format`
//! says, for every line, access lines included. JSON lines are flat: the
//! event's fields sit beside `timestamp`, `level`, `target` and `message`.
//!
//! The formatter hands each line to `tracing-appender`'s non-blocking
//! writer, and a thread of its own writes them to stderr, so a request
//! never waits on a slow terminal or a full pipe. That thread writes what
//! has queued up in one system call (up to 8 KiB), not one per line, and
//! lets nothing wait once the queue is empty. When it falls behind by
//! [`QUEUED_LINES`], new lines are dropped rather than waited for: a
//! stalled stderr costs lines, never proxying. The lines still queued are
//! written when [`Logging`] is dropped, so the binary keeps it for its
//! whole life.
//!
//! The format and the access log's switch can change while the gateway
//! runs ([`Logging::apply`]): the formatter sits in a
//! `tracing_subscriber::reload` layer, and the access log reads its
//! [`AccessSwitch`] per request.

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::{SubscriberInitExt, TryInitError};
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt, reload};

use crate::access_log::AccessSwitch;
use crate::config::{LogConfig, LogFormat};

/// The lines that may wait for the writing thread: a stall of about a
/// third of a second at 50 000 access lines a second. The queue's slots
/// are allocated up front (32 bytes each), so `tracing-appender`'s
/// default, 128 000, would cost every gateway 4 MB of memory.
pub const QUEUED_LINES: usize = 16 * 1024;

/// What the formatter sits on: the registry behind the `RUST_LOG` filter.
type Filtered = Layered<EnvFilter, Registry>;
/// The text or the JSON formatter.
type Formatter = Box<dyn Layer<Filtered> + Send + Sync>;

/// The process's logging, set up once; keep it alive until exit, or
/// queued lines are lost.
pub struct Logging {
    control: LogControl,
    _flush_on_drop: WorkerGuard,
}

/// Changes the running logging's settings; cloned for whatever applies a
/// reloaded configuration.
#[derive(Clone)]
pub struct LogControl {
    formatter: reload::Handle<Formatter, Filtered>,
    writer: NonBlocking,
    /// Colours, when stderr is a terminal.
    ansi: bool,
    access: AccessSwitch,
}

impl Logging {
    /// Installs the process-wide subscriber with `config`'s format and
    /// access switch, writing to stderr; an error if a subscriber is
    /// installed already.
    pub fn init(config: &LogConfig) -> Result<Self, TryInitError> {
        let ansi = std::io::stderr().is_terminal();
        Self::install(config, std::io::stderr(), ansi)
    }

    /// As [`Logging::init`], writing to `out`, without colours.
    pub fn init_writing_to<W>(config: &LogConfig, out: W) -> Result<Self, TryInitError>
    where
        W: std::io::Write + Send + 'static,
    {
        Self::install(config, out, false)
    }

    fn install<W>(config: &LogConfig, out: W, ansi: bool) -> Result<Self, TryInitError>
    where
        W: std::io::Write + Send + 'static,
    {
        let (filter, refused) = env_filter();
        // The writing thread flushes whenever its queue runs empty.
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(QUEUED_LINES)
            .thread_name("switchyard-log")
            .finish(std::io::BufWriter::new(out));
        let (formatter, handle) = reload::Layer::new(formatter(config.format, &writer, ansi));
        tracing_subscriber::registry()
            .with(filter)
            .with(formatter)
            .try_init()?;
        if let Some((directives, error)) = refused {
            tracing::warn!(RUST_LOG = directives.as_str(), %error, "RUST_LOG ignored; logging at info");
        }
        Ok(Self {
            control: LogControl {
                formatter: handle,
                writer,
                ansi,
                access: AccessSwitch::new(config.access),
            },
            _flush_on_drop: guard,
        })
    }

    /// Switches to `config`'s settings ([`LogControl::apply`]).
    pub fn apply(&self, config: &LogConfig) -> Result<(), reload::Error> {
        self.control.apply(config)
    }

    /// The handle that changes these settings while the process runs.
    pub fn control(&self) -> &LogControl {
        &self.control
    }

    /// The access log's switch, for the gateway
    /// ([`crate::Gateway::with_access_switch`]).
    pub fn access_switch(&self) -> &AccessSwitch {
        &self.control.access
    }
}

impl LogControl {
    /// Switches to `config`'s format, from the next line on, and turns the
    /// access log on or off, from the next request on.
    pub fn apply(&self, config: &LogConfig) -> Result<(), reload::Error> {
        self.access.set(config.access);
        self.formatter
            .reload(formatter(config.format, &self.writer, self.ansi))
    }
}

/// `RUST_LOG`'s filter, or `info` when it is unset or empty; with the
/// directives and the reason when they were refused.
fn env_filter() -> (EnvFilter, Option<(String, String)>) {
    match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => match EnvFilter::try_new(&directives) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new("info"), Some((directives, e.to_string()))),
        },
        _ => (EnvFilter::new("info"), None),
    }
}

fn formatter(format: LogFormat, writer: &NonBlocking, ansi: bool) -> Formatter {
    let layer = fmt::layer().with_writer(writer.clone());
    match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => layer.with_ansi(false).json().flatten_event(true).boxed(),
    }
}
