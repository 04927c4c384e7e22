//! switchyard: a client-side load-balancing gateway.
//!
//! Services register their instances over REST; the gateway health-checks
//! them, and other services call each other through it at
//! `/call/<service>/...`, guarded by a circuit breaker per instance and safe,
//! budgeted retries.
//!
//! The modules, in the order a request meets them:
//!
//! - [`server`]: accept loop, connection limits, graceful shutdown; the
//!   gateway's own HTTP/1 server, and hyper's for HTTP/2.
//! - [`http1`]: the one HTTP/1 codec, for the server and the client side.
//! - [`stack`]: the gateway as one tower service, which every way in calls:
//!   request ids, sensitive headers, the access log, body limits, then the
//!   router.
//! - [`access_log`]: one line per proxied request, as the stack's layer.
//! - [`router`]: `/services*` → [`api`], `/call/*` → the proxy, `/healthz`,
//!   `/status` → [`status`], `/metrics` → [`metrics`].
//! - [`api`]: the registry's REST handlers and their JSON shapes.
//! - [`status`]: the live status page and the snapshot it polls.
//! - [`metrics`]: what the gateway counts, and `/metrics` in the
//!   Prometheus text format.
//! - [`auth`]: the admin token that guards registry writes.
//! - [`registry`]: services and instances, health state, the health checker.
//! - [`breaker`]: the per-instance circuit breaker and its state machine.
//! - [`outcome`]: how an attempt at an instance ended, for the breaker,
//!   the retry decision and the error answer alike.
//! - [`proxy`]: `/call/<service>/...`: forwarding, headers, the retry loop.
//! - [`balance`]: picking an instance.
//! - [`retry`]: retry decisions, the retry budget, the replay buffer.
//! - [`upstream`]: the upstream policy, per-instance keep-alive connection
//!   pools, the HTTP/1.1 client that uses them, and an attempt's time limit.
//! - [`error`]: the gateway's errors and the one place they become HTTP.
//! - [`body`]: the one body type, and bounded body reading.
//! - [`config`]: `gateway.toml`, defaults, environment overrides, validation.
//! - [`log`]: where log lines go and in what shape, changeable while running.
//! - [`gateway`]: the shared state handed to every connection, and
//!   applying a reloaded configuration to it.
//! - [`reload`]: what a reload changes, what needs a restart, and the
//!   record of reloads.
//! - [`splice`]: large answers moved from the instance's socket to the
//!   client's without copying them.
//! - [`write_batch`]: writes that go out together at the end of the event
//!   loop's turn, in one system call.

// The one exception is `write_batch`'s io_uring submission, in a file of
// its own whose documentation carries the safety argument.
#![deny(unsafe_code)]

pub mod access_log;
pub mod api;
pub mod auth;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod config;
pub mod error;
pub mod gateway;
pub mod http1;
pub mod log;
pub mod metrics;
pub mod outcome;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod retry;
pub mod router;
pub mod server;
pub mod socket;
pub mod splice;
pub mod stack;
pub mod status;
pub mod upstream;
pub mod write_batch;

pub use config::Config;
pub use gateway::Gateway;
pub use stack::{Peer, Stack};
