//! The binary itself (SPEC §1): `check-config`, refusing bad configuration
//! before binding, environment overrides, and exit 0 on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A fresh directory for one test's files, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("switchyard-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary in `dir`, with none of the variables it reads inherited from
/// the test's own environment.
fn gateway(dir: &TempDir) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(&dir.0);
    for var in [
        "SERVICE_PORT",
        "SERVICE_NAME",
        "SWITCHYARD_ADMIN_TOKEN",
        "RUST_LOG",
    ] {
        command.env_remove(var);
    }
    command
}

fn run(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> Output {
    gateway(dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_prints_effective_config_and_derived_figures() {
    let dir = TempDir::new("check");
    let path = dir.file(
        "g.toml",
        "[health_check]\ninterval = \"10s\"\ntimeout = \"2s\"\n[retry]\nmax_attempts = 4\n",
    );
    let out = run(
        &dir,
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "interval = \"10s\"",
        "connect_timeout = \"2s\"",
        "half_open_max_requests = 1",
        "max_attempts = 4",
        "max_header_bytes = 65536",
        "10s × 3 + 2s = 32s",
        "most upstream attempts one request can make = max_attempts = 4",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // `--config` also works before the subcommand.
    let out = run(
        &dir,
        &["--config", path.to_str().unwrap(), "check-config"],
        &[],
    );
    assert!(out.status.success());
}

#[test]
fn without_a_file_the_defaults_apply_and_gateway_toml_is_read_if_present() {
    let dir = TempDir::new("defaults");
    let out = run(&dir, &["check-config"], &[]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("from built-in defaults"));
    assert!(stdout(&out).contains("listen = \"127.0.0.1:8080\""));
    dir.file("gateway.toml", "[gateway]\nlisten = \"127.0.0.1:8181\"\n");
    let out = run(&dir, &["check-config"], &[]);
    assert!(
        stdout(&out).contains("from gateway.toml"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("listen = \"127.0.0.1:8181\""));
}

#[test]
fn environment_overrides_show_in_the_effective_config() {
    let dir = TempDir::new("env");
    let out = run(
        &dir,
        &["check-config"],
        &[
            ("SERVICE_PORT", "9999"),
            ("SERVICE_NAME", "edge-1"),
            ("SWITCHYARD_ADMIN_TOKEN", "t0ken"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("listen = \"127.0.0.1:9999\""), "{text}");
    assert!(text.contains("name = \"edge-1\""));
    assert!(text.contains("admin_token = \"<redacted>\"") && !text.contains("t0ken"));
    let out = run(&dir, &["check-config"], &[("SERVICE_PORT", "eighty")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("SERVICE_PORT"), "{}", stderr(&out));
}

#[test]
fn bad_configuration_exits_non_zero_naming_the_key_and_never_starts() {
    let dir = TempDir::new("bad");
    let cases = [
        ("[retry]\nmax_attempts = 0\n", "retry.max_attempts"),
        ("[health_check]\ntimeout = \"soon\"\n", "timeout"),
        ("[proxy]\nnope = 1\n", "nope"),
        ("[gateway\n", "line 1"),
    ];
    for (text, key) in cases {
        let path = dir.file("bad.toml", text);
        for args in [vec!["check-config", "--config"], vec!["--config"]] {
            let mut args = args.clone();
            args.push(path.to_str().unwrap());
            // Without check-config this would serve forever if it started.
            let out = run(&dir, &args, &[]);
            assert_eq!(out.status.code(), Some(1), "{args:?} {text:?}");
            assert!(
                stderr(&out).contains(key),
                "{key:?} not in {}",
                stderr(&out)
            );
        }
    }
    let out = run(&dir, &["--config", "missing.toml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.toml"));
}

#[test]
fn a_port_in_use_exits_non_zero() {
    let dir = TempDir::new("inuse");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&dir, &["--listen", &addr], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&addr), "{}", stderr(&out));
}

/// The gateway process with its stderr lines arriving on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(dir: &TempDir, env: &[(&str, &str)]) -> (Self, String) {
        let mut child = gateway(dir)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Self { child, lines };
        let line = running.wait_for("listening");
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the listening line names the address")
            .to_string();
        (running, addr)
    }

    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn serves_with_env_overrides_and_exits_zero_on_sigterm() {
    let dir = TempDir::new("serve");
    dir.file(
        "gateway.toml",
        "[gateway]\nlisten = \"127.0.0.1:1\"\nworkers = 3\n[[services]]\nname = \"static-svc\"\nurls = [\"http://127.0.0.1:9\"]\n",
    );
    // SERVICE_PORT=0 replaces the file's port: the OS picks a free one.
    let (running, addr) = Running::start(
        &dir,
        &[
            ("SERVICE_PORT", "0"),
            ("SERVICE_NAME", "edge-7"),
            ("RUST_LOG", "info,switchyard::registry=warn"),
        ],
    );
    assert!(
        addr.starts_with("127.0.0.1:") && addr != "127.0.0.1:1",
        "{addr}"
    );
    let reply = http(
        &addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let reply = http(
        &addr,
        "GET /services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.contains("\"static-svc\""), "{reply}");
    let body = r#"{"name":"dyn","url":"http://127.0.0.1:9"}"#;
    let reply = http(
        &addr,
        &format!(
            "POST /services HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let status = running.terminate_after_checking_logs();
    assert_eq!(status.code(), Some(0));
}

impl Running {
    /// RUST_LOG silenced the registry's info lines; the server's still show.
    fn terminate_after_checking_logs(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut seen = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(20)) {
            seen.push(line);
        }
        assert!(seen.iter().any(|l| l.contains("shutting down")), "{seen:?}");
        assert!(
            !seen.iter().any(|l| l.contains("instance registered")),
            "{seen:?}"
        );
        self.child.wait().unwrap()
    }
}

#[test]
fn a_second_gateway_on_the_same_port_is_refused() {
    let dir = TempDir::new("twice");
    let (running, addr) = Running::start(&dir, &[("SERVICE_PORT", "0")]);
    let out = run(&dir, &["--listen", &addr], &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "workers share a port only with each other"
    );
    assert!(stderr(&out).contains("cannot listen"), "{}", stderr(&out));
    assert_eq!(running.terminate().code(), Some(0));
}

#[test]
fn sigterm_on_an_idle_gateway_exits_zero() {
    let dir = TempDir::new("idle");
    let (running, _) = Running::start(&dir, &[("SERVICE_PORT", "0")]);
    assert_eq!(running.terminate().code(), Some(0));
}

#[test]
fn the_admin_token_from_the_environment_guards_writes() {
    let dir = TempDir::new("token");
    let (running, addr) = Running::start(
        &dir,
        &[
            ("SERVICE_PORT", "0"),
            ("SWITCHYARD_ADMIN_TOKEN", "env-t0ken"),
        ],
    );
    let body = r#"{"name":"dyn","url":"http://127.0.0.1:9"}"#;
    let post = |auth: &str| {
        http(
            &addr,
            &format!(
                "POST /services HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let reply = post("");
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{reply}"
    );
    let reply = post("Authorization: Bearer env-t0ken\r\n");
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    assert_eq!(running.terminate().code(), Some(0));
}

#[test]
fn listening_beyond_loopback_without_a_token_warns() {
    let dir = TempDir::new("warn");
    let mut child = gateway(&dir)
        .args(["--listen", "0.0.0.0:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut warned = false;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("without an admin token") {
            warned = true;
        }
        if line.contains("listening") && !line.contains("without") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned);
}

#[test]
fn max_connections_holds_across_workers() {
    use std::io::{Read, Write};
    let dir = TempDir::new("maxconn");
    dir.file(
        "gateway.toml",
        "[gateway]\nworkers = 3\n[limits]\nmax_connections = 2\n",
    );
    let (running, addr) = Running::start(&dir, &[("SERVICE_PORT", "0")]);
    let ask = |stream: &mut std::net::TcpStream| {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    };
    let mut first = std::net::TcpStream::connect(&addr).unwrap();
    let mut second = std::net::TcpStream::connect(&addr).unwrap();
    ask(&mut first);
    ask(&mut second);
    // Whichever worker the kernel hands it to, a third waits its turn.
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(
        third.read(&mut buf).is_err(),
        "served beyond max_connections"
    );
    drop(first);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = third.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop((second, third));
    assert_eq!(running.terminate().code(), Some(0));
}
