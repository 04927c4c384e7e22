//! The registry at scale, through the real gateway binary:
//!
//! - registering 100 000 instances (10 000 services × 10) over the REST API,
//!   with health checks off and with the default 30 s checks;
//! - proxying with those 100 000 instances registered against a gateway
//!   holding one service of 10 instances (the lookup must not care).
//!
//!     cargo bench --bench registry_scale

mod support;

use std::time::Duration;

use support::{GatewayProcess, Upstreams, load, register_all, row};

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

fn main() {
    let Some(seconds) = support::seconds() else {
        return;
    };
    let duration = Duration::from_secs(seconds);
    let warmup = Duration::from_secs(1);
    let upstreams = Upstreams::start(3);
    let total = SERVICES * PER_SERVICE;

    println!(
        "registry scale: {total} instances ({SERVICES} services x {PER_SERVICE}), 16 client connections"
    );
    for (label, checks) in [
        ("health checks off", "0s"),
        ("health checks every 30s", "30s"),
    ] {
        let gateway = GatewayProcess::start(&format!("[health_check]\ninterval = \"{checks}\"\n"));
        let took = register_all(gateway.addr, registrations(&upstreams, SERVICES), 16);
        let (rss, _) = gateway.memory_kib();
        println!(
            "register {total} instances, {label}: {:.2} s ({:.0}/s), RSS after {:.1} MB",
            took.as_secs_f64(),
            total as f64 / took.as_secs_f64(),
            rss as f64 / 1024.0
        );
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
