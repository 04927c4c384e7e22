//! The registry at scale, through the real gateway binary:
//!
//! - registering 100 000 instances (10 000 services × 10) over the REST API,
//!   16 client connections: in memory and on the file store with health
//!   checks off, in memory with the default 30 s checks, and in memory with
//!   a TTL on each (what the TTL wheel costs in memory);
//! - one registration at a time on one connection, in memory and on the
//!   file store: the latency a durable acknowledgement adds;
//! - proxying with those 100 000 instances registered against a gateway
//!   holding one service of 10 instances (the lookup must not care).
//!
//!     cargo bench --bench registry_scale

mod support;

use std::time::Duration;

use support::{GatewayProcess, Upstreams, load, register_all, register_bodies, row};

const SERVICES: usize = 10_000;
const PER_SERVICE: usize = 10;

fn registrations(upstreams: &Upstreams, services: usize) -> Vec<(String, String, String)> {
    let mut all = Vec::with_capacity(services * PER_SERVICE);
    for s in 0..services {
        for i in 0..PER_SERVICE {
            let addr = upstreams.addrs[i % upstreams.addrs.len()];
            all.push((
                format!("service-{s}"),
                format!("http://{addr}"),
                format!("i-{i}"),
            ));
        }
    }
    all
}

/// The same registrations as JSON bodies, each with `extra` fields.
fn bodies(upstreams: &Upstreams, services: usize, extra: &str) -> Vec<String> {
    registrations(upstreams, services)
        .into_iter()
        .map(|(name, url, id)| format!(r#"{{"name":"{name}","url":"{url}","id":"{id}"{extra}}}"#))
        .collect()
}

/// A file store's path for one gateway, removed (with redb's side files)
/// when dropped.
struct StoreFile(std::path::PathBuf);

impl StoreFile {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "switchyard-bench-store-{tag}-{}.db",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    fn config(&self) -> String {
        format!(
            "[registry]\nstore = \"file\"\npath = \"{}\"\n",
            self.0.display()
        )
    }
}

impl Drop for StoreFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let Some(seconds) = support::seconds() else {
        return;
    };
    // `cargo bench --bench registry_scale -- <word>`: only the rows whose
    // label holds the word.
    let only = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let wanted = |label: &str| label.contains(only.as_str());
    let duration = Duration::from_secs(seconds);
    let warmup = Duration::from_secs(1);
    let upstreams = Upstreams::start(3);
    let total = SERVICES * PER_SERVICE;

    println!(
        "registry scale: {total} instances ({SERVICES} services x {PER_SERVICE}), 16 client connections"
    );
    let file = StoreFile::new("bulk");
    let mut rss_without_ttl = 0;
    for (label, config, extra) in [
        ("memory, health checks off", String::new(), ""),
        ("file store, health checks off", file.config(), ""),
        ("memory, health checks every 30s", String::new(), ""),
        (
            "memory, health checks off, ttl 1h",
            String::new(),
            r#","ttl":"1h""#,
        ),
    ] {
        if !wanted(label) {
            continue;
        }
        let checks = if label.contains("30s") { "30s" } else { "0s" };
        let gateway = GatewayProcess::start(&format!(
            "[health_check]\ninterval = \"{checks}\"\n{config}"
        ));
        let served = upstreams.served();
        let (took, _) = register_bodies(gateway.addr, bodies(&upstreams, SERVICES, extra), 16);
        let (rss, _) = gateway.memory_kib();
        println!(
            "register {total} instances, {label}: {:.2} s ({:.0}/s), RSS after {:.1} MB",
            took.as_secs_f64(),
            total as f64 / took.as_secs_f64(),
            rss as f64 / 1024.0
        );
        if checks == "30s" {
            // Idle memory with checks on: once every instance's first
            // check has been answered (the upstreams count them), and a
            // moment for the gateway to record the last ones.
            let started = std::time::Instant::now();
            while upstreams.served() < served + total as u64 {
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "{} of {total} first checks answered in 2 min",
                    upstreams.served() - served
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let done = started.elapsed() + took;
            std::thread::sleep(Duration::from_secs(1));
            let (rss, _) = gateway.memory_kib();
            println!(
                "  first checks of all {total} answered {:.2} s after registering began; RSS then {:.1} MB",
                done.as_secs_f64(),
                rss as f64 / 1024.0
            );
        }
        if label == "memory, health checks off" {
            rss_without_ttl = rss;
        } else if !extra.is_empty() {
            println!(
                "  the TTLs of {total} instances cost {:.1} MB",
                (rss as f64 - rss_without_ttl as f64) / 1024.0
            );
        }
    }

    println!();
    println!("one registration at a time, one connection, 2 000 registrations");
    let file = StoreFile::new("single");
    for (label, config) in [("memory", String::new()), ("file store", file.config())] {
        if !wanted(&format!("{label}, one at a time")) {
            continue;
        }
        let gateway =
            GatewayProcess::start(&format!("[health_check]\ninterval = \"0s\"\n{config}"));
        let (_, mut latencies) = register_bodies(gateway.addr, bodies(&upstreams, 200, ""), 1);
        latencies.sort();
        println!(
            "{label:>10}: median {:>7.0} µs, p99 {:>7.0} µs",
            percentile(&latencies, 0.5).as_secs_f64() * 1e6,
            percentile(&latencies, 0.99).as_secs_f64() * 1e6,
        );
    }

    if !wanted("proxying") {
        return;
    }
    println!();
    println!("proxying, 64 connections, {seconds} s per row, health checks off");
    let small = GatewayProcess::start("[health_check]\ninterval = \"0s\"\n");
    register_all(small.addr, registrations(&upstreams, 1), 1);
    let big = GatewayProcess::start("[health_check]\ninterval = \"0s\"\n");
    register_all(big.addr, registrations(&upstreams, SERVICES), 16);
    // Interleaved, so drift in the machine's load hits both alike; the
    // median of the rounds' ratios, as the shared machine is noisy.
    const ROUNDS: usize = 5;
    let mut ratios = Vec::new();
    for _ in 0..ROUNDS {
        let one = load(small.addr, "/call/service-0/", 64, warmup, duration);
        let many = load(
            big.addr,
            &format!("/call/service-{}/", SERVICES / 2),
            64,
            warmup,
            duration,
        );
        println!("{}", row("1 service x 10 instances", &one));
        println!("{}", row("10 000 services x 10 instances", &many));
        ratios.push(many.rps() / one.rps());
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "10 000-service / 1-service req/s (median of {ROUNDS} rounds' ratios): {:.3}",
        ratios[ROUNDS / 2]
    );
}
