//! What the load benches share: in-process upstream servers, the gateway
//! binary started on a free port, and a closed-loop load generator that
//! records every latency (like wrk, but with nothing to install).

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// Seconds per measured row (`BENCH_SECONDS`, default 5), or `None` when
/// the harness only asks for a listing (`cargo test --benches`).
pub fn seconds() -> Option<u64> {
    if std::env::args().any(|a| a == "--list") {
        return None;
    }
    Some(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    )
}

/// Upstream servers answering `hello` to everything, on their own thread.
pub struct Upstreams {
    pub addrs: Vec<SocketAddr>,
    /// Requests answered so far, by all of them.
    pub served: Arc<AtomicU64>,
}

impl Upstreams {
    pub fn start(count: usize) -> Self {
        let served = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        let addrs = serve_on_own_thread(count, move |listener| {
            serve_hello(listener, counter.clone())
        });
        Self { addrs, served }
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// Binds `count` listeners on 127.0.0.1 and serves each with `serve` on a
/// single-threaded runtime of a thread of their own, which runs as long as
/// the process; gives their addresses back once they listen.
pub fn serve_on_own_thread<S, F>(count: usize, serve: S) -> Vec<SocketAddr>
where
    S: Fn(TcpListener) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        block_on(async move {
            let mut addrs = Vec::new();
            for _ in 0..count {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                addrs.push(listener.local_addr().expect("addr"));
                tokio::spawn(serve(listener));
            }
            tx.send(addrs).expect("report addresses");
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("servers started")
}

/// Runs `future` to its end on a single-threaded runtime of the calling
/// thread.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

async fn serve_hello(listener: TcpListener, served: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let served = served.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| {
                served.fetch_add(1, Ordering::Relaxed);
                async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello\n"))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The real `switchyard` binary, release build, on a free port (the one
/// `BENCH_GATEWAY_BIN` names, if set).
pub struct GatewayProcess {
    pub addr: SocketAddr,
    child: Child,
    dir: std::path::PathBuf,
}

impl GatewayProcess {
    pub fn start(config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("gateway.toml");
        std::fs::write(
            &path,
            format!("[gateway]\nlisten = \"127.0.0.1:0\"\n{config}"),
        )
        .expect("config");
        // BENCH_GATEWAY_BIN: another build of the gateway, to compare two
        // builds in one run.
        let binary = std::env::var("BENCH_GATEWAY_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_switchyard").to_string());
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn,switchyard=info,switchyard::registry=warn")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("gateway starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("gateway listening");
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("listening address");
        Self { addr, child, dir }
    }

    /// Resident memory now and at its peak, in KiB, from /proc.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time the gateway has used so far (user + system, all threads),
    /// in seconds, from /proc: to the clock tick (10 ms).
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The fields after the command name, which is in parentheses and
        // may hold spaces: utime and stime are the 12th and 13th of them.
        let after_name = stat.rsplit(')').next().unwrap_or("");
        let ticks: u64 = after_name
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|t| t.parse::<u64>().ok())
            .sum();
        // USER_HZ, fixed at 100 for user space on every Linux architecture.
        ticks as f64 / 100.0
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Registers `(name, url, id)` triples over `connections` keep-alive
/// connections at once; returns how long it took.
pub fn register_all(
    gateway: SocketAddr,
    registrations: Vec<(String, String, String)>,
    connections: usize,
) -> Duration {
    let bodies = registrations
        .into_iter()
        .map(|(name, url, id)| format!(r#"{{"name":"{name}","url":"{url}","id":"{id}"}}"#))
        .collect();
    register_bodies(gateway, bodies, connections).0
}

/// POSTs each JSON body to `/services` over `connections` keep-alive
/// connections at once; returns how long it all took and each
/// registration's latency.
pub fn register_bodies(
    gateway: SocketAddr,
    bodies: Vec<String>,
    connections: usize,
) -> (Duration, Vec<Duration>) {
    block_on(async move {
        let started = Instant::now();
        let chunk = bodies.len().div_ceil(connections);
        let mut tasks = Vec::new();
        for part in bodies.chunks(chunk.max(1)) {
            let part = part.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut sender = connect(gateway).await;
                let mut latencies = Vec::with_capacity(part.len());
                for body in part {
                    let sent = Instant::now();
                    let request = Request::post("/services")
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .body(
                            Full::new(Bytes::from(body))
                                .map_err(|never| match never {})
                                .boxed(),
                        )
                        .expect("request");
                    let response = sender
                        .send_request(request)
                        .await
                        .expect("registration answered");
                    assert!(
                        response.status().is_success(),
                        "registration refused: {}",
                        response.status()
                    );
                    let _ = response.into_body().collect().await;
                    latencies.push(sent.elapsed());
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("registrations"));
        }
        (started.elapsed(), latencies)
    })
}

type Sender = hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, Infallible>,
>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

/// What one load run measured.
pub struct Load {
    pub requests: u64,
    pub failures: u64,
    pub elapsed: Duration,
    latencies_us: Vec<u32>,
}

impl Load {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        let at = ((self.latencies_us.len() as f64 - 1.0) * p / 100.0).round() as usize;
        Duration::from_micros(u64::from(self.latencies_us[at]))
    }
}

/// Closed-loop load: `connections` keep-alive connections each sending
/// `GET path` back to back for `warmup + duration`; only the last
/// `duration` is measured. One client thread, like `wrk -t1`.
pub fn load(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> Load {
    let path = path.to_string();
    block_on(async move {
        let measure_from = Instant::now() + warmup;
        let until = measure_from + duration;
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let path = path.clone();
            tasks.push(tokio::spawn(async move {
                let mut sender = connect(addr).await;
                let (mut requests, mut failures, mut latencies) = (0u64, 0u64, Vec::new());
                loop {
                    let start = Instant::now();
                    if start >= until {
                        break;
                    }
                    let request = Request::get(path.as_str())
                        .header("host", "bench")
                        .body(Empty::new().map_err(|never| match never {}).boxed())
                        .expect("request");
                    let ok = match sender.send_request(request).await {
                        Ok(response) => {
                            let ok = response.status().is_success();
                            ok && response.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    if start >= measure_from {
                        requests += 1;
                        failures += u64::from(!ok);
                        latencies
                            .push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    if !ok && sender.ready().await.is_err() {
                        sender = connect(addr).await;
                    }
                }
                (requests, failures, latencies)
            }));
        }
        let mut total = Load {
            requests: 0,
            failures: 0,
            elapsed: duration,
            latencies_us: Vec::new(),
        };
        for task in tasks {
            let (requests, failures, latencies) = task.await.expect("load task");
            total.requests += requests;
            total.failures += failures;
            total.latencies_us.extend(latencies);
        }
        total.latencies_us.sort_unstable();
        total
    })
}

/// One table row.
pub fn row(label: &str, load: &Load) -> String {
    format!(
        "{label:<34} {:>9.0} req/s   p50 {:>7.3} ms   p99 {:>7.3} ms   failures {}",
        load.rps(),
        load.percentile(50.0).as_secs_f64() * 1e3,
        load.percentile(99.0).as_secs_f64() * 1e3,
        load.failures
    )
}
