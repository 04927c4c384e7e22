//! `gateway.toml`: the configuration structs, their defaults, loading,
//! environment overrides and validation (SPEC §1–§2, §6).
//!
//! Every section and key is optional: each struct's `Default` lists the
//! normative defaults in one place. Loading is parse → inherit per-service
//! overrides → environment → command line → `validate()`, and any failure names
//! the key (or the line) and stops the process before it binds anything: the
//! gateway never starts half-configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::registry::validate;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "gateway.toml";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub proxy: ProxyConfig,
    pub health_check: HealthCheckConfig,
    pub circuit_breaker: CircuitBreakerConfig,
    pub retry: RetryConfig,
    pub load_balancer: LoadBalancerConfig,
    pub limits: LimitsConfig,
    pub upstreams: UpstreamsConfig,
    pub registry: RegistryConfig,
    pub log: LogConfig,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<StaticService>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway's own name, used in `Via` (`SERVICE_NAME`).
    pub name: String,
    /// Where the gateway listens (`SERVICE_PORT` replaces the port).
    pub listen: SocketAddr,
    /// Non-empty: registry writes need `Authorization: Bearer <token>`.
    #[serde(serialize_with = "redact")]
    pub admin_token: String,
    /// How long in-flight requests may finish after SIGINT/SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Worker threads, each with its own event loop, listening socket and
    /// upstream connections; 0 means one per CPU core.
    pub workers: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            name: "registry".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: String::new(),
            shutdown_grace: Duration::from_secs(30),
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// The whole request, every attempt included, until response headers.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle upstream connections are closed after this; keep it below the
    /// upstreams' own keep-alive timeout.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// After response headers: a body (either way) that makes no progress
    /// for this long aborts the exchange, and both connections close.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(90),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between active checks of one instance, ±10% jitter; zero disables them.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `GET <instance url><path>`; any 2xx passes.
    pub path: String,
    /// Consecutive failures that take an instance to `unhealthy`.
    pub unhealthy_threshold: u32,
    /// Consecutive passes that take an instance to `healthy`.
    pub healthy_threshold: u32,
    /// An instance unhealthy for this long is removed; zero: never.
    #[serde(with = "humantime_serde")]
    pub deregister_after: Duration,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            path: "/health".into(),
            unhealthy_threshold: 3,
            healthy_threshold: 1,
            deregister_after: Duration::ZERO,
        }
    }
}

impl HealthCheckConfig {
    /// Worst-case time from an instance's death to its being marked
    /// unhealthy: `interval × unhealthy_threshold + timeout`.
    pub fn time_to_notice_dead(&self) -> Duration {
        self.interval * self.unhealthy_threshold + self.timeout
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open a closed circuit.
    pub failure_threshold: u32,
    /// How long an open circuit refuses traffic before it lets a probe through.
    #[serde(with = "humantime_serde")]
    pub reset_timeout: Duration,
    /// Probe requests admitted at once while half-open.
    pub half_open_max_requests: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            reset_timeout: Duration::from_secs(30),
            half_open_max_requests: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Total tries per request, the first included; 1 disables retries.
    pub max_attempts: u32,
    pub retry_on_status: Vec<u16>,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Retries may add at most this fraction to the request rate ...
    pub budget_ratio: f64,
    /// ... plus this many retries per second, over a 10 s window.
    pub budget_min_per_sec: u32,
    /// Request bodies up to this size are kept for a retry; larger ones are
    /// streamed once and never retried.
    pub max_replay_body_bytes: u64,
    /// One attempt's limit until response headers. Unset: `request_timeout /
    /// max_attempts`, so that a hanging instance leaves time to try another.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_on_status: vec![502, 503, 504],
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            max_replay_body_bytes: 65536,
            per_try_timeout: None,
        }
    }
}

impl RetryConfig {
    /// The per-attempt timeout in force given the request timeout.
    pub fn effective_per_try_timeout(&self, request_timeout: Duration) -> Duration {
        self.per_try_timeout
            .unwrap_or_else(|| request_timeout / self.max_attempts.max(1))
            .min(request_timeout)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadBalancerConfig {
    pub strategy: Strategy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Uniformly random among the routable instances.
    #[default]
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Concurrent client connections; past it new ones wait in the backlog.
    pub max_connections: u32,
    /// A client slower than this sending its request head is cut off.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// No request-body progress for this long aborts the request (408).
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Larger request heads get 431.
    pub max_header_bytes: u32,
    /// Registry-wide instance limit; past it 429 `limit_exceeded`.
    pub max_instances: u32,
    pub max_instances_per_service: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            max_header_bytes: 65_536,
            max_instances: 100_000,
            max_instances_per_service: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamsConfig {
    /// Empty means any address that `deny` does not cover.
    #[serde(deserialize_with = "networks")]
    pub allow: Vec<IpNet>,
    #[serde(deserialize_with = "networks")]
    pub deny: Vec<IpNet>,
}

/// CIDR networks (`"10.0.0.0/8"`), or single addresses (`"10.0.0.1"`, read
/// as `/32` or `/128`).
fn networks<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    let written = Vec::<String>::deserialize(deserializer)?;
    written
        .iter()
        .map(|net| {
            net.parse::<IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{net:?} is neither a CIDR network (\"10.0.0.0/8\") nor an IP address"
                    ))
                })
        })
        .collect()
}

impl Default for UpstreamsConfig {
    fn default() -> Self {
        let deny = [
            "169.254.0.0/16",
            "fe80::/10",
            "0.0.0.0/8",
            "::/128",
            "224.0.0.0/4",
            "ff00::/8",
        ];
        Self {
            allow: Vec::new(),
            deny: deny
                .iter()
                .map(|net| net.parse().expect("the default deny list is valid CIDR"))
                .collect(),
        }
    }
}

/// Where registrations are kept (SPEC §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    pub store: StoreKind,
    /// `store = "file"`: the one file that holds every registration.
    pub path: PathBuf,
    /// `store = "etcd"` (SPEC §8): the cluster's client URLs.
    pub endpoints: Vec<String>,
    /// `store = "etcd"`: every key of this registry starts with it, so
    /// several registries can share one cluster.
    pub prefix: String,
    /// `store = "etcd"`: how long connecting, and each request, may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `store = "etcd"`: with the cluster unreachable at start, exit 1
    /// (`true`), or serve the static services, refuse registry writes and
    /// keep trying (`false`).
    pub require_store_at_start: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Memory,
            path: PathBuf::from("switchyard.db"),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/switchyard".into(),
            connect_timeout: Duration::from_secs(5),
            require_store_at_start: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In memory only: a restart forgets every registration.
    #[default]
    Memory,
    /// One crash-safe file: a write is acknowledged once it is on disk.
    File,
    /// An etcd cluster shared by several gateways (SPEC §8); needs the
    /// build's `etcd` feature.
    Etcd,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::File => "file",
            Self::Etcd => "etcd",
        }
    }
}

/// Logging (SPEC §9): the access log, and the format of every line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// One line per proxied request.
    pub access: bool,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A service registered at start, with optional per-service overrides.
///
/// An override section inherits every key it does not set from the
/// gateway-wide section of the same name, not from the built-in defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticService {
    pub name: String,
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
}

/// The resolved health, breaker and retry settings of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    pub health_check: HealthCheckConfig,
    pub circuit_breaker: CircuitBreakerConfig,
    pub retry: RetryConfig,
}

/// Why a configuration was refused. Each names the file, key or variable.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    Parse {
        origin: String,
        message: String,
    },
    Invalid {
        key: String,
        message: String,
    },
    Env {
        var: &'static str,
        message: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Self::Parse { origin, message } => write!(f, "{origin}: {}", message.trim_end()),
            Self::Invalid { key, message } => write!(f, "invalid value for `{key}`: {message}"),
            Self::Env { var, message } => {
                write!(f, "invalid environment variable {var}: {message}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Where the effective configuration came from, for logs and `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Defaults,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Defaults => f.write_str("built-in defaults"),
        }
    }
}

impl Config {
    /// Reads `path`, or `./gateway.toml` if it exists, or takes the defaults.
    /// The result is parsed but not yet validated (overrides come first).
    pub fn read(path: Option<&Path>) -> Result<(Self, ConfigSource), ConfigError> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Ok((Self::default(), ConfigSource::Defaults)),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config = Self::parse(&text, &path.display().to_string())?;
        Ok((config, ConfigSource::File(path)))
    }

    /// Parses TOML text (`origin` names it in errors) and resolves the
    /// per-service overrides. Does not validate.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        };
        // Typed parse first: unknown keys and bad values are reported with
        // their line. The raw table then tells which override keys were set.
        let mut config: Config = toml::from_str(text).map_err(parse_error)?;
        let raw: toml::Table = toml::from_str(text).map_err(parse_error)?;
        config.inherit_overrides(&raw)?;
        Ok(config)
    }

    /// Parses and validates, as the gateway does for a file.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config = Self::parse(text, "config")?;
        config.validate()?;
        Ok(config)
    }

    fn inherit_overrides(&mut self, raw: &toml::Table) -> Result<(), ConfigError> {
        let Some(raw_services) = raw.get("services").and_then(toml::Value::as_array) else {
            return Ok(());
        };
        for (i, (service, raw)) in self.services.iter_mut().zip(raw_services).enumerate() {
            let section = |name: &str| raw.get(name).and_then(toml::Value::as_table);
            let key = |name: &str| format!("services[{i}].{name}");
            service.health_check = inherit(
                &self.health_check,
                section("health_check"),
                &key("health_check"),
            )?;
            service.circuit_breaker = inherit(
                &self.circuit_breaker,
                section("circuit_breaker"),
                &key("circuit_breaker"),
            )?;
            service.retry = inherit(&self.retry, section("retry"), &key("retry"))?;
        }
        Ok(())
    }

    /// Applies `SERVICE_PORT`, `SERVICE_NAME` and `SWITCHYARD_ADMIN_TOKEN`
    /// as found by `lookup` (empty values count as unset).
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let get = |var: &str| lookup(var).filter(|v| !v.is_empty());
        if let Some(port) = get("SERVICE_PORT") {
            let port = port.trim().parse::<u16>().map_err(|_| ConfigError::Env {
                var: "SERVICE_PORT",
                message: format!("expected a port number 0-65535, got {port:?}"),
            })?;
            self.gateway.listen.set_port(port);
        }
        if let Some(name) = get("SERVICE_NAME") {
            self.gateway.name = name;
        }
        if let Some(token) = get("SWITCHYARD_ADMIN_TOKEN") {
            self.gateway.admin_token = token;
        }
        Ok(())
    }

    /// Checks every value against its allowed range; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let g = &self.gateway;
        validate::service_name(&g.name).map_err(|m| invalid("gateway.name", m))?;
        if g.admin_token.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(invalid(
                "gateway.admin_token",
                "must be printable ASCII without spaces",
            ));
        }
        at_most("gateway.shutdown_grace", g.shutdown_grace, HOUR)?;
        in_range("gateway.workers", g.workers, 0, 1024)?;

        let p = &self.proxy;
        positive("proxy.request_timeout", p.request_timeout, DAY)?;
        positive("proxy.connect_timeout", p.connect_timeout, HOUR)?;
        positive("proxy.pool_idle_timeout", p.pool_idle_timeout, DAY)?;
        positive("proxy.idle_timeout", p.idle_timeout, DAY)?;

        validate_health(&self.health_check, "health_check")?;
        validate_breaker(&self.circuit_breaker, "circuit_breaker")?;
        validate_retry(&self.retry, "retry")?;

        if self.registry.store == StoreKind::File && self.registry.path.as_os_str().is_empty() {
            return Err(invalid(
                "registry.path",
                "must name a file when store = \"file\"",
            ));
        }
        if self.registry.store == StoreKind::Etcd {
            validate_etcd(&self.registry)?;
        }

        let l = &self.limits;
        in_range("limits.max_connections", l.max_connections, 1, 1_000_000)?;
        positive("limits.header_read_timeout", l.header_read_timeout, HOUR)?;
        positive("limits.body_idle_timeout", l.body_idle_timeout, HOUR)?;
        // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
        in_range(
            "limits.max_header_bytes",
            l.max_header_bytes,
            8192,
            16 << 20,
        )?;
        in_range("limits.max_instances", l.max_instances, 1, 10_000_000)?;
        in_range(
            "limits.max_instances_per_service",
            l.max_instances_per_service,
            1,
            l.max_instances,
        )?;

        let mut names = std::collections::HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let key = |name: &str| format!("services[{i}].{name}");
            validate::service_name(&service.name).map_err(|m| invalid(key("name"), m))?;
            if !names.insert(service.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("service {:?} is listed twice", service.name),
                ));
            }
            if service.urls.is_empty() {
                return Err(invalid(key("urls"), "must list at least one instance URL"));
            }
            for (j, url) in service.urls.iter().enumerate() {
                validate::InstanceUrl::parse(url)
                    .map_err(|m| invalid(format!("services[{i}].urls[{j}]"), m))?;
            }
            if let Some(h) = &service.health_check {
                validate_health(h, &key("health_check"))?;
            }
            if let Some(b) = &service.circuit_breaker {
                validate_breaker(b, &key("circuit_breaker"))?;
            }
            if let Some(r) = &service.retry {
                validate_retry(r, &key("retry"))?;
            }
        }
        Ok(())
    }

    /// The settings of the service `name` if its `[[services]]` entry
    /// overrides any; `None` means the gateway-wide sections apply.
    pub fn override_for(&self, name: &str) -> Option<ServicePolicy> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .filter(|s| {
                s.health_check.is_some() || s.circuit_breaker.is_some() || s.retry.is_some()
            })
            .map(|_| self.policy_for(name))
    }

    /// The settings in force for the service `name`: its `[[services]]`
    /// overrides if it has any, else the gateway-wide sections.
    pub fn policy_for(&self, name: &str) -> ServicePolicy {
        let service = self.services.iter().find(|s| s.name == name);
        ServicePolicy {
            health_check: service
                .and_then(|s| s.health_check.clone())
                .unwrap_or_else(|| self.health_check.clone()),
            circuit_breaker: service
                .and_then(|s| s.circuit_breaker.clone())
                .unwrap_or_else(|| self.circuit_breaker.clone()),
            retry: service
                .and_then(|s| s.retry.clone())
                .unwrap_or_else(|| self.retry.clone()),
        }
    }

    /// The effective configuration as TOML, every default filled in and the
    /// admin token redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration structs serialize to TOML")
    }

    /// `check-config`'s report: the effective configuration followed by the
    /// figures derived from it, as TOML comments.
    pub fn report(&self, source: &ConfigSource) -> String {
        let mut out = format!("# effective configuration, from {source}\n\n");
        out.push_str(&self.to_toml());
        out.push_str("\n# derived figures\n");
        out.push_str(&match self.registry.store {
            StoreKind::Memory => {
                "# registry store: memory (a restart forgets every registration)\n".to_string()
            }
            StoreKind::File => format!(
                "# registry store: file {} (a write is acknowledged once it is on disk)\n",
                self.registry.path.display()
            ),
            StoreKind::Etcd => format!(
                "# registry store: etcd {} prefix {} (a write is acknowledged once etcd committed it)\n",
                self.registry.endpoints.join(","),
                self.registry.prefix
            ),
        });
        let mut figures = |label: &str, policy: &ServicePolicy| {
            let h = &policy.health_check;
            if h.interval.is_zero() {
                out.push_str(&format!(
                    "# {label}: active health checks disabled (interval = \"0s\"); \
                     a dead instance is noticed by its circuit breaker only\n"
                ));
            } else {
                out.push_str(&format!(
                    "# {label}: worst-case time to notice a dead instance = interval × \
                     unhealthy_threshold + timeout = {} × {} + {} = {}\n",
                    fmt_duration(h.interval),
                    h.unhealthy_threshold,
                    fmt_duration(h.timeout),
                    fmt_duration(h.time_to_notice_dead()),
                ));
            }
            let r = &policy.retry;
            out.push_str(&format!(
                "# {label}: most upstream attempts one request can make = max_attempts = {}\n",
                r.max_attempts
            ));
            out.push_str(&format!(
                "# {label}: per-attempt timeout = {} (request_timeout {})\n",
                fmt_duration(r.effective_per_try_timeout(self.proxy.request_timeout)),
                fmt_duration(self.proxy.request_timeout),
            ));
        };
        figures("all services", &self.policy_for(""));
        for service in &self.services {
            if service.health_check.is_some()
                || service.circuit_breaker.is_some()
                || service.retry.is_some()
            {
                figures(
                    &format!("service {}", service.name),
                    &self.policy_for(&service.name),
                );
            }
        }
        out
    }
}

/// Formats a duration the way the config file writes them (`"1m 35s"`).
pub fn fmt_duration(d: Duration) -> String {
    if d.is_zero() {
        "0s".into()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// `store = "etcd"` needs endpoints, a prefix that cannot be confused with
/// another registry's, and a build that has the etcd client.
fn validate_etcd(r: &RegistryConfig) -> Result<(), ConfigError> {
    if !cfg!(feature = "etcd") {
        return Err(invalid(
            "registry.store",
            "\"etcd\" needs a build with the etcd feature (cargo build --release --features etcd)",
        ));
    }
    if r.endpoints.is_empty() {
        return Err(invalid("registry.endpoints", "must list at least one URL"));
    }
    for endpoint in &r.endpoints {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(invalid(
                "registry.endpoints",
                format!("{endpoint:?} must be an http:// or https:// URL"),
            ));
        }
    }
    if !r.prefix.starts_with('/') || r.prefix.trim_matches('/').is_empty() {
        return Err(invalid(
            "registry.prefix",
            "must start with \"/\" and name something (\"/switchyard\")",
        ));
    }
    positive(
        "registry.connect_timeout",
        r.connect_timeout,
        Duration::from_secs(60),
    )?;
    Ok(())
}

/// An override section: the global section with the keys set in `explicit`
/// replaced. `None` when the service has no such section.
fn inherit<T: Serialize + DeserializeOwned>(
    global: &T,
    explicit: Option<&toml::Table>,
    key: &str,
) -> Result<Option<T>, ConfigError> {
    let Some(explicit) = explicit else {
        return Ok(None);
    };
    let mut merged = toml::Table::try_from(global).map_err(|e| invalid(key, e.to_string()))?;
    merged.extend(explicit.iter().map(|(k, v)| (k.clone(), v.clone())));
    merged
        .try_into()
        .map(Some)
        .map_err(|e: toml::de::Error| invalid(key, e.to_string()))
}

fn redact<S: serde::Serializer>(token: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(if token.is_empty() { "" } else { "<redacted>" })
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn validate_health(h: &HealthCheckConfig, section: &str) -> Result<(), ConfigError> {
    if !h.interval.is_zero() && h.interval < Duration::from_millis(100) {
        return Err(invalid(
            format!("{section}.interval"),
            format!(
                "must be \"0s\" (disabled) or at least 100ms, got {}",
                fmt_duration(h.interval)
            ),
        ));
    }
    at_most(&format!("{section}.interval"), h.interval, DAY)?;
    positive(&format!("{section}.timeout"), h.timeout, HOUR)?;
    if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(invalid(
            format!("{section}.path"),
            format!(
                "must be an absolute URL path such as \"/health\", got {:?}",
                h.path
            ),
        ));
    }
    in_range(
        &format!("{section}.unhealthy_threshold"),
        h.unhealthy_threshold,
        1,
        1000,
    )?;
    in_range(
        &format!("{section}.healthy_threshold"),
        h.healthy_threshold,
        1,
        1000,
    )?;
    at_most(
        &format!("{section}.deregister_after"),
        h.deregister_after,
        Duration::from_secs(30 * 86_400),
    )
}

fn validate_breaker(b: &CircuitBreakerConfig, section: &str) -> Result<(), ConfigError> {
    in_range(
        &format!("{section}.failure_threshold"),
        b.failure_threshold,
        1,
        1000,
    )?;
    positive(&format!("{section}.reset_timeout"), b.reset_timeout, DAY)?;
    in_range(
        &format!("{section}.half_open_max_requests"),
        b.half_open_max_requests,
        1,
        1000,
    )
}

fn validate_retry(r: &RetryConfig, section: &str) -> Result<(), ConfigError> {
    in_range(&format!("{section}.max_attempts"), r.max_attempts, 1, 10)?;
    for status in &r.retry_on_status {
        in_range(&format!("{section}.retry_on_status"), *status, 400, 599)?;
    }
    at_most(
        &format!("{section}.backoff_base"),
        r.backoff_base,
        Duration::from_secs(60),
    )?;
    at_most(
        &format!("{section}.backoff_max"),
        r.backoff_max,
        Duration::from_secs(60),
    )?;
    if r.backoff_max < r.backoff_base {
        return Err(invalid(
            format!("{section}.backoff_max"),
            format!(
                "must not be below backoff_base ({}), got {}",
                fmt_duration(r.backoff_base),
                fmt_duration(r.backoff_max)
            ),
        ));
    }
    if !(0.0..=10.0).contains(&r.budget_ratio) {
        return Err(invalid(
            format!("{section}.budget_ratio"),
            format!("must be between 0.0 and 10.0, got {}", r.budget_ratio),
        ));
    }
    in_range(
        &format!("{section}.budget_min_per_sec"),
        r.budget_min_per_sec,
        0,
        100_000,
    )?;
    in_range(
        &format!("{section}.max_replay_body_bytes"),
        r.max_replay_body_bytes,
        0,
        64 << 20,
    )?;
    if let Some(t) = r.per_try_timeout {
        positive(&format!("{section}.per_try_timeout"), t, DAY)?;
    }
    Ok(())
}

fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

fn positive(key: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    at_most(key, value, max)
}

fn at_most(key: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value > max {
        return Err(invalid(
            key,
            format!(
                "must be at most {}, got {}",
                fmt_duration(max),
                fmt_duration(value)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::from_toml(text).expect_err("refused").to_string()
    }

    #[test]
    fn empty_file_gives_the_spec_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.gateway.name, "registry");
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.gateway.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.gateway.workers, 0, "one per core");
        assert_eq!(c.proxy.request_timeout, Duration::from_secs(30));
        assert_eq!(c.proxy.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.proxy.pool_idle_timeout, Duration::from_secs(90));
        assert_eq!(c.health_check.interval, Duration::from_secs(30));
        assert_eq!(c.health_check.timeout, Duration::from_secs(5));
        assert_eq!(c.health_check.path, "/health");
        assert_eq!(
            (
                c.health_check.unhealthy_threshold,
                c.health_check.healthy_threshold
            ),
            (3, 1)
        );
        assert_eq!(c.circuit_breaker.failure_threshold, 3);
        assert_eq!(c.circuit_breaker.reset_timeout, Duration::from_secs(30));
        assert_eq!(c.circuit_breaker.half_open_max_requests, 1);
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.retry.retry_on_status, [502, 503, 504]);
        assert_eq!(c.retry.backoff_base, Duration::from_millis(25));
        assert_eq!(c.retry.backoff_max, Duration::from_millis(250));
        assert_eq!(c.retry.budget_ratio, 0.2);
        assert_eq!(c.retry.budget_min_per_sec, 10);
        assert_eq!(c.retry.max_replay_body_bytes, 65536);
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.limits.max_header_bytes, 65_536);
        assert_eq!(c.upstreams.deny.len(), 6);
    }

    #[test]
    fn the_repository_gateway_toml_is_valid_and_listens_on_8080() {
        let text = include_str!("../gateway.toml");
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn the_spec_example_parses() {
        let c = Config::from_toml(
            r#"
            [gateway]
            name = "registry"
            listen = "127.0.0.1:8080"
            [health_check]
            interval = "0s"
            [retry]
            budget_ratio = 0.25
            [[services]]
            name = "user-service"
            urls = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
            "#,
        )
        .unwrap();
        assert!(c.health_check.interval.is_zero());
        assert_eq!(c.services[0].urls.len(), 2);
        assert_eq!(c.services[0].retry, None);
    }

    fn validated(text: &str) -> Result<Config, String> {
        let c = Config::from_toml(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn the_etcd_store_needs_its_feature_endpoints_and_a_prefix() {
        let etcd = "[registry]\nstore = \"etcd\"\n";
        if cfg!(feature = "etcd") {
            let c = validated(etcd).unwrap();
            assert_eq!(c.registry.endpoints, ["http://127.0.0.1:2379"]);
            assert_eq!(c.registry.prefix, "/switchyard");
            validated(&format!("{etcd}prefix = \"/team-a/switchyard/\"\n")).unwrap();
            for (extra, key) in [
                ("endpoints = []", "registry.endpoints"),
                ("endpoints = [\"127.0.0.1:2379\"]", "registry.endpoints"),
                ("prefix = \"switchyard\"", "registry.prefix"),
                ("prefix = \"/\"", "registry.prefix"),
                ("prefix = \"\"", "registry.prefix"),
                ("connect_timeout = \"0s\"", "registry.connect_timeout"),
            ] {
                let e = validated(&format!("{etcd}{extra}\n")).expect_err(extra);
                assert!(e.contains(key), "{extra}: {e}");
            }
        } else {
            let e = validated(etcd).expect_err("refused without the feature");
            assert!(
                e.contains("registry.store") && e.contains("--features etcd"),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name_and_line() {
        let e = error_of("[health_check]\nintervall = \"5s\"\n");
        assert!(e.contains("intervall") && e.contains("line 2"), "{e}");
        let e = error_of("[gatway]\nname = \"x\"\n");
        assert!(e.contains("gatway"), "{e}");
        let e = error_of(
            "[[services]]\nname = \"a\"\nurls = [\"http://h:1\"]\n[services.retry]\nmax_atempts = 2\n",
        );
        assert!(e.contains("max_atempts"), "{e}");
    }

    #[test]
    fn bad_syntax_and_types_name_the_line() {
        let e = error_of("[proxy\n");
        assert!(e.contains("line 1"), "{e}");
        let e = error_of("[retry]\nmax_attempts = \"three\"\n");
        assert!(e.contains("max_attempts") || e.contains("line 2"), "{e}");
        let e = error_of("[circuit_breaker]\nfailure_threshold = -1\n");
        assert!(e.contains("line 2"), "{e}");
        let e = error_of("[gateway]\nlisten = \"nowhere\"\n");
        assert!(e.contains("listen") || e.contains("line 2"), "{e}");
        let e = error_of("[load_balancer]\nstrategy = \"round_robin\"\n");
        assert!(e.contains("round_robin"), "{e}");
        let e = error_of("[upstreams]\ndeny = [\"10.0.0.0/33\"]\n");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn upstream_networks_take_cidrs_and_plain_addresses() {
        let c = Config::from_toml(
            "[upstreams]\nallow = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::1\"]\ndeny = []\n",
        )
        .unwrap();
        let allow: Vec<String> = c.upstreams.allow.iter().map(|n| n.to_string()).collect();
        assert_eq!(allow, ["10.0.0.0/8", "192.168.1.7/32", "fd00::1/128"]);
        assert!(c.upstreams.deny.is_empty());
        let e = error_of("[upstreams]\ndeny = [\"metadata\"]\n");
        assert!(e.contains("metadata") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_durations_are_refused() {
        for bad in ["\"5 parsecs\"", "\"-1s\"", "5", "\"\""] {
            let e = error_of(&format!("[proxy]\nconnect_timeout = {bad}\n"));
            assert!(
                e.contains("connect_timeout") || e.contains("line 2"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn every_range_check_names_its_key() {
        let cases = [
            ("[gateway]\nname = \"Bad Name\"", "gateway.name"),
            (
                "[gateway]\nadmin_token = \"has space\"",
                "gateway.admin_token",
            ),
            (
                "[gateway]\nshutdown_grace = \"2h\"",
                "gateway.shutdown_grace",
            ),
            ("[proxy]\nrequest_timeout = \"0s\"", "proxy.request_timeout"),
            ("[proxy]\nconnect_timeout = \"0s\"", "proxy.connect_timeout"),
            (
                "[proxy]\npool_idle_timeout = \"0s\"",
                "proxy.pool_idle_timeout",
            ),
            (
                "[health_check]\ninterval = \"10ms\"",
                "health_check.interval",
            ),
            ("[health_check]\ntimeout = \"0s\"", "health_check.timeout"),
            ("[health_check]\npath = \"health\"", "health_check.path"),
            (
                "[health_check]\nunhealthy_threshold = 0",
                "health_check.unhealthy_threshold",
            ),
            (
                "[health_check]\nhealthy_threshold = 0",
                "health_check.healthy_threshold",
            ),
            (
                "[circuit_breaker]\nfailure_threshold = 0",
                "circuit_breaker.failure_threshold",
            ),
            (
                "[circuit_breaker]\nreset_timeout = \"0s\"",
                "circuit_breaker.reset_timeout",
            ),
            (
                "[circuit_breaker]\nhalf_open_max_requests = 0",
                "circuit_breaker.half_open_max_requests",
            ),
            ("[retry]\nmax_attempts = 0", "retry.max_attempts"),
            ("[retry]\nmax_attempts = 11", "retry.max_attempts"),
            ("[retry]\nretry_on_status = [200]", "retry.retry_on_status"),
            ("[retry]\nbackoff_base = \"2m\"", "retry.backoff_base"),
            (
                "[retry]\nbackoff_base = \"1s\"\nbackoff_max = \"10ms\"",
                "retry.backoff_max",
            ),
            ("[retry]\nbudget_ratio = -0.1", "retry.budget_ratio"),
            ("[retry]\nbudget_ratio = nan", "retry.budget_ratio"),
            (
                "[retry]\nbudget_min_per_sec = 1000000",
                "retry.budget_min_per_sec",
            ),
            (
                "[retry]\nmax_replay_body_bytes = 1000000000",
                "retry.max_replay_body_bytes",
            ),
            ("[retry]\nper_try_timeout = \"0s\"", "retry.per_try_timeout"),
            ("[limits]\nmax_connections = 0", "limits.max_connections"),
            (
                "[limits]\nheader_read_timeout = \"0s\"",
                "limits.header_read_timeout",
            ),
            (
                "[limits]\nbody_idle_timeout = \"0s\"",
                "limits.body_idle_timeout",
            ),
            (
                "[limits]\nmax_header_bytes = 100",
                "limits.max_header_bytes",
            ),
            ("[limits]\nmax_instances = 0", "limits.max_instances"),
            (
                "[limits]\nmax_instances = 10\nmax_instances_per_service = 11",
                "limits.max_instances_per_service",
            ),
            (
                "[[services]]\nname = \"-x\"\nurls = [\"http://h:1\"]",
                "services[0].name",
            ),
            ("[[services]]\nname = \"x\"\nurls = []", "services[0].urls"),
            (
                "[[services]]\nname = \"x\"\nurls = [\"http://h:1\", \"ftp://h\"]",
                "services[0].urls[1]",
            ),
            (
                "[[services]]\nname = \"x\"\nurls = [\"http://h:1\"]\n[[services]]\nname = \"x\"\nurls = [\"http://h:2\"]",
                "services[1].name",
            ),
            (
                "[[services]]\nname = \"x\"\nurls = [\"http://h:1\"]\n[services.health_check]\nunhealthy_threshold = 0",
                "services[0].health_check.unhealthy_threshold",
            ),
            (
                "[[services]]\nname = \"x\"\nurls = [\"http://h:1\"]\n[services.retry]\nmax_attempts = 99",
                "services[0].retry.max_attempts",
            ),
        ];
        for (text, key) in cases {
            let e = error_of(text);
            assert!(e.contains(&format!("`{key}`")), "{text:?} gave {e}");
        }
    }

    #[test]
    fn service_overrides_inherit_from_the_global_sections() {
        let c = Config::from_toml(
            r#"
            [retry]
            max_attempts = 5
            backoff_base = "10ms"
            [health_check]
            interval = "7s"
            [[services]]
            name = "a"
            urls = ["http://h:1"]
            [services.retry]
            max_attempts = 2
            [[services]]
            name = "b"
            urls = ["http://h:2"]
            "#,
        )
        .unwrap();
        let a = c.policy_for("a");
        assert_eq!(a.retry.max_attempts, 2);
        assert_eq!(
            a.retry.backoff_base,
            Duration::from_millis(10),
            "inherited from [retry]"
        );
        assert_eq!(
            a.health_check.interval,
            Duration::from_secs(7),
            "no override section"
        );
        let b = c.policy_for("b");
        assert_eq!(b.retry.max_attempts, 5);
        assert_eq!(c.policy_for("dynamic").retry.max_attempts, 5);
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c =
            Config::from_toml("[gateway]\nlisten = \"0.0.0.0:9000\"\nname = \"file\"").unwrap();
        let env = |var: &str| match var {
            "SERVICE_PORT" => Some("7000".to_string()),
            "SERVICE_NAME" => Some("from-env".to_string()),
            "SWITCHYARD_ADMIN_TOKEN" => Some("s3cret".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        assert_eq!(c.gateway.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(c.gateway.name, "from-env");
        assert_eq!(c.gateway.admin_token, "s3cret");
        // Empty values count as unset.
        c.apply_env(|_| Some(String::new())).unwrap();
        assert_eq!(c.gateway.listen.port(), 7000);
        let e = c
            .apply_env(|v| (v == "SERVICE_PORT").then(|| "http".into()))
            .unwrap_err();
        assert!(e.to_string().contains("SERVICE_PORT"), "{e}");
    }

    #[test]
    fn an_invalid_service_name_from_the_environment_is_refused() {
        let mut c = Config::default();
        c.apply_env(|v| (v == "SERVICE_NAME").then(|| "Not Valid".into()))
            .unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`gateway.name`")
        );
    }

    #[test]
    fn report_shows_defaults_and_derived_figures_and_hides_the_token() {
        let mut c = Config::from_toml(
            "[[services]]\nname = \"slow\"\nurls = [\"http://h:1\"]\n[services.health_check]\ninterval = \"10s\"\nunhealthy_threshold = 2\n",
        )
        .unwrap();
        c.gateway.admin_token = "s3cret".into();
        let report = c.report(&ConfigSource::Defaults);
        assert!(!report.contains("s3cret"));
        assert!(report.contains("admin_token = \"<redacted>\""));
        assert!(report.contains("30s × 3 + 5s = 1m 35s"), "{report}");
        assert!(report.contains("service slow: worst-case time to notice a dead instance = interval × unhealthy_threshold + timeout = 10s × 2 + 5s = 25s"), "{report}");
        assert!(report.contains("most upstream attempts one request can make = max_attempts = 3"));
        // The report is itself a valid configuration with the same values.
        let reparsed = Config::parse(&report, "report").unwrap();
        assert_eq!(reparsed.policy_for("slow"), c.policy_for("slow"));
        assert_eq!(reparsed.retry, c.retry);
    }

    #[test]
    fn per_try_timeout_defaults_to_a_share_of_the_request_timeout() {
        let r = RetryConfig::default();
        assert_eq!(
            r.effective_per_try_timeout(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        let r = RetryConfig {
            per_try_timeout: Some(Duration::from_secs(60)),
            ..r
        };
        assert_eq!(
            r.effective_per_try_timeout(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }
}
