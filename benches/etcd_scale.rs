//! The etcd store at scale (SPEC §8), against a real etcd started here
//! (`/usr/bin/etcd`, Debian `etcd-server`) on free ports:
//!
//! - a new gateway loading 10 000 instances from etcd and routing by them;
//! - a burst of 1 000 registrations at gateway A, until gateway B lists
//!   every one of them.
//!
//!     cargo bench --features etcd --bench etcd_scale

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{GatewayProcess, register_bodies};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// One etcd member on free ports, removed with its data when dropped.
struct Etcd {
    child: Child,
    url: String,
    data: std::path::PathBuf,
}

impl Etcd {
    fn start() -> Self {
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data =
            std::env::temp_dir().join(format!("switchyard-bench-etcd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let child = Command::new("etcd")
            .args(["--name", "default", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (Debian: apt-get install etcd-server)");
        let etcd = Self { child, url, data };
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(etcd.url.trim_start_matches("http://"), "/health")
            .is_none_or(|a| !a.contains("\"health\":\"true\""))
        {
            assert!(Instant::now() < deadline, "etcd did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }

    fn config(&self) -> String {
        format!(
            "[health_check]\ninterval = \"0s\"\n[registry]\nstore = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"/bench\"\n",
            self.url
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A plain HTTP/1.0 GET; the whole answer, or `None`.
fn get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// How many instances `gateway` lists for `service`.
fn listed(gateway: &GatewayProcess, service: &str) -> usize {
    get(
        &gateway.addr.to_string(),
        &format!("/services/{service}/instances"),
    )
    .map_or(0, |answer| answer.matches("\"id\":").count())
}

fn bodies(service: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|n| {
            format!(
                r#"{{"name":"{service}-{}","url":"http://10.{}.{}.{}:80"}}"#,
                n / 10,
                (n >> 16) & 255,
                (n >> 8) & 255,
                n & 255
            )
        })
        .collect()
}

fn main() {
    if support::seconds().is_none() {
        return;
    }
    let etcd = Etcd::start();
    let a = GatewayProcess::start(&etcd.config());
    let (took, _) = register_bodies(a.addr, bodies("load", 10_000), 16);
    println!(
        "register 10 000 instances at A (etcd, 16 connections): {:.2} s",
        took.as_secs_f64()
    );

    let started = Instant::now();
    let b = GatewayProcess::start(&etcd.config());
    let listening = started.elapsed();
    while listed(&b, "load-999") < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B never loaded"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "a new gateway B: start to listening {:.2} s, to routing by all 10 000 {:.2} s",
        listening.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let (took, _) = register_bodies(a.addr, bodies("burst", 1_000), 16);
    let acked = started.elapsed();
    while listed(&b, "burst-99") < 10 || listed(&b, "burst-0") < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B never saw the burst"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // Every one of them, not just the last services.
    let all = (0..100)
        .map(|s| listed(&b, &format!("burst-{s}")))
        .sum::<usize>();
    println!(
        "a burst of 1 000 registrations at A: acknowledged in {:.2} s, all at B {:.2} s after the burst began ({all} listed)",
        took.as_secs_f64().max(acked.as_secs_f64()),
        started.elapsed().as_secs_f64()
    );
}
