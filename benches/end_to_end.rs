//! End to end on loopback: three in-process upstreams, the real gateway
//! binary, and a closed-loop load generator. Prints requests/s and p50/p99
//! through `/call` against calling an upstream directly (the gateway's
//! overhead as a ratio), the latency one connection adds, and the
//! gateway's memory idle and under load.
//!
//!     cargo bench --bench end_to_end
//!
//! The machine is shared: compare the ratios from one run, not absolute
//! numbers across runs.

mod support;

use std::time::Duration;

use support::{GatewayProcess, Upstreams, load, register_all, row};

fn main() {
    let Some(seconds) = support::seconds() else {
        return;
    };
    let duration = Duration::from_secs(seconds);
    let warmup = Duration::from_secs(1);
    let upstreams = Upstreams::start(3);
    let gateway = GatewayProcess::start("[health_check]\ninterval = \"30s\"\n");
    let registrations = upstreams
        .addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            (
                "bench".to_string(),
                format!("http://{addr}"),
                format!("u{i}"),
            )
        })
        .collect();
    register_all(gateway.addr, registrations, 1);
    // Let the first health checks finish before measuring memory at rest.
    std::thread::sleep(Duration::from_millis(500));
    let (idle_rss, _) = gateway.memory_kib();

    println!("end to end, {seconds} s per row after 1 s warm-up, one client thread");
    let direct = load(upstreams.addrs[0], "/", 64, warmup, duration);
    let proxied = load(gateway.addr, "/call/bench/", 64, warmup, duration);
    println!("{}", row("direct, 64 connections", &direct));
    println!("{}", row("through the gateway, 64 connections", &proxied));
    let (_, loaded_peak) = gateway.memory_kib();

    let direct1 = load(upstreams.addrs[0], "/", 1, warmup, duration);
    let proxied1 = load(gateway.addr, "/call/bench/", 1, warmup, duration);
    println!("{}", row("direct, 1 connection", &direct1));
    println!("{}", row("through the gateway, 1 connection", &proxied1));

    println!();
    println!(
        "gateway / direct req/s, 64 connections: {:.3}",
        proxied.rps() / direct.rps()
    );
    let added = proxied1.percentile(50.0).as_secs_f64() - direct1.percentile(50.0).as_secs_f64();
    println!("latency added at p50, 1 connection: {:.0} us", added * 1e6);
    println!("gateway RSS idle: {:.1} MB", idle_rss as f64 / 1024.0);
    println!(
        "gateway RSS peak under 64-connection load: {:.1} MB",
        loaded_peak as f64 / 1024.0
    );
}
