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
//!   HTTP/1.1 fast path that serves the common proxied request itself and
//!   hands everything else to hyper.
//! - [`framing`]: the request-framing check hyper leaves to us.
//! - [`router`]: `/services*` → [`api`], `/call/*` → the proxy, `/healthz`.
//! - [`api`]: the registry's REST handlers and their JSON shapes.
//! - [`auth`]: the admin token that guards registry writes.
//! - [`registry`]: services and instances, health state, the health checker.
//! - [`breaker`]: the per-instance circuit breaker and its state machine.
//! - [`proxy`]: `/call/<service>/...`: forwarding, headers, the retry loop.
//! - [`balance`]: picking an instance.
//! - [`retry`]: retry decisions, the retry budget, the replay buffer.
//! - [`upstream`]: the upstream policy, per-instance keep-alive connection
//!   pools and the HTTP/1.1 client that uses them.
//! - [`error`]: the gateway's errors and the one place they become HTTP.
//! - [`body`]: the one body type, and bounded body reading.
//! - [`config`]: `gateway.toml`, defaults, environment overrides, validation.
//! - [`gateway`]: the shared state handed to every connection.
//! - [`turn`]: writes that go out together at the end of the event loop's
//!   turn, in one system call.

// The one exception is `turn`'s io_uring submission, whose safety argument
// is written beside it.
#![deny(unsafe_code)]

pub mod api;
pub mod auth;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod config;
pub mod error;
pub mod framing;
pub mod gateway;
pub mod proxy;
pub mod registry;
pub mod retry;
pub mod router;
pub mod server;
pub mod turn;
pub mod upstream;

pub use config::Config;
pub use gateway::Gateway;
