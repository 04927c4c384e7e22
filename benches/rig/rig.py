#!/usr/bin/env python3
"""switchyard side by side with nginx, HAProxy and Caddy, on one machine.

Starts three upstream instances (nginx, one port each), the peer proxies
(nginx, HAProxy, Caddy: random balancing over the three, passive failure
detection, retries on another instance) and switchyard, then drives each with
wrk in interleaved rounds and prints medians of requests/s, 2xx requests/s,
p50/p99 latency, CPU time per request and memory, with switchyard's ratios
against the best peer. See README.md next to this file.

    python3 benches/rig/rig.py [--workloads hello,resp1m | --all] [--scenario healthy,dead,error500]
                               [--rounds 3] [--seconds 5] [--conns 64] [--json FILE] [--markdown]

Env: GATEWAY_BIN           switchyard binary (default: <repo>/target/release/switchyard)
     GATEWAY_CONFIG_EXTRA  TOML text appended to the gateway.toml the rig writes
     SWITCHYARD_ADMIN_TOKEN  sent as a bearer token when registering instances
Needs: nginx, haproxy, caddy and wrk (Debian: apt-get install -y nginx haproxy caddy wrk).
"""
import argparse
import datetime
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TEMPLATES = HERE / "templates"

# Fixed ports, outside Linux's default ephemeral range (32768-60999).
UPSTREAM_PORTS = (28181, 28182, 28183)
PORTS = {"direct": UPSTREAM_PORTS[0], "nginx": 28080, "haproxy": 28081, "caddy": 28082, "switchyard": 28090}
PROXIES = ("direct", "nginx", "haproxy", "caddy", "switchyard")
PEERS = ("nginx", "haproxy", "caddy")
DISPLAY = {"direct": "direct (instance 1)", "nginx": "nginx", "haproxy": "HAProxy", "caddy": "Caddy", "switchyard": "switchyard"}
PREFIX = "/call/bench"  # every proxy maps /call/bench/<rest> to /<rest> on an instance
SCENARIOS = ("healthy", "dead", "error500")
CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB = 1024


@dataclass(frozen=True)
class Workload:
    name: str
    path: str            # path on an instance
    what: str
    file_size: int = 0   # GET of a generated file of this size
    body_size: int = 0   # POST with a body of this size
    close: bool = False  # Connection: close on every request


WORKLOADS = {w.name: w for w in (
    Workload("hello", "/", "GET, small text answer"),
    Workload("resp16k", "/files/16k.bin", "GET of a 16 KiB file", file_size=16 * KIB),
    Workload("resp256k", "/files/256k.bin", "GET of a 256 KiB file", file_size=256 * KIB),
    Workload("resp1m", "/files/1m.bin", "GET of a 1 MiB file", file_size=1024 * KIB),
    Workload("post1k", "/post", "POST of a 1 KiB body, small answer", body_size=1 * KIB),
    Workload("post64k", "/post", "POST of a 64 KiB body, small answer", body_size=64 * KIB),
    Workload("close", "/", "GET hello with Connection: close (a new connection per request)", close=True),
)}


class RigError(Exception):
    pass


# ---------------------------------------------------------------- processes

def session_pids(sid):
    """Live pids whose session is sid: a process started with
    start_new_session and every process it forks (nginx's workers)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(d))
    return pids


def cpu_seconds(sid):
    """utime + stime of every process of the session (all threads included)."""
    ticks = 0
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks / CLK_TCK


def memory_kib(sid):
    """(sum of VmHWM, sum of VmRSS) over the session's processes, in KiB."""
    hwm = rss = 0
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        except OSError:
            continue
    return hwm, rss


class Procs:
    """Everything the rig starts, each in its own session (and so process
    group), so that one signal reaches a process and all of its children."""

    def __init__(self, rig):
        self.rig = rig
        self.live = {}

    def start(self, name, cmd, env=None):
        e = dict(os.environ)
        e.update(env or {})
        with open(self.rig / "logs" / f"{name}.out", "w") as log:
            try:
                p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=e, cwd=self.rig, start_new_session=True)
            except OSError as err:
                raise RigError(f"cannot start {name} ({cmd[0]}): {err}")
        self.live[name] = p
        return p

    def stop(self, name, sig=signal.SIGTERM, grace=5.0):
        p = self.live.pop(name, None)
        if p is None:
            return
        sid = p.pid
        try:
            os.killpg(sid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if p.poll() is not None and not session_pids(sid):
                return
            time.sleep(0.02)
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def check_alive(self):
        dead = [n for n, p in self.live.items() if n != "wrk" and p.poll() is not None]
        if dead:
            raise RigError("exited unexpectedly: " + ", ".join(
                f"{n} (exit {self.live[n].returncode})\n--- {n} log:\n{self.log_tail(n)}" for n in dead))

    def stop_all(self):
        for name in list(self.live):
            self.stop(name)

    def log_tail(self, name, n=2000):
        """The end of what the process wrote, and of nginx's error log."""
        text = ""
        for suffix in ("out", "err"):
            try:
                text += (self.rig / "logs" / f"{name}.{suffix}").read_text(errors="replace")
            except OSError:
                pass
        return text[-n:]


# ---------------------------------------------------------------- set-up

def port_free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT left by a previous run is fine
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(port, timeout=20.0, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def render(template, dest, **values):
    text = (TEMPLATES / template).read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z0-9_]+@", text)
    if left:
        raise RigError(f"{template}: no value for {', '.join(sorted(set(left)))}")
    dest.write_text(text)


def write_configs(rig, scenario, conns, gateway_extra):
    worker_connections = max(4096, conns * 4)
    maxconn = max(8000, conns * 4)
    keepalive = max(128, conns)
    u = dict(U1=UPSTREAM_PORTS[0], U2=UPSTREAM_PORTS[1], U3=UPSTREAM_PORTS[2])
    for i, port in enumerate(UPSTREAM_PORTS, 1):
        broken = 'return 500 "error from 2\\n";' if scenario == "error500" and i == 2 else ""
        render("upstream.conf", rig / f"upstream{i}.conf", RIG=rig, N=i, PORT=port, BROKEN=broken,
               WORKER_CONNECTIONS=worker_connections)
    render("nginx.conf", rig / "nginx.conf", RIG=rig, PORT=PORTS["nginx"], WORKER_CONNECTIONS=worker_connections,
           UPSTREAM_KEEPALIVE=keepalive, **u)
    render("haproxy.cfg", rig / "haproxy.cfg", PORT=PORTS["haproxy"], MAXCONN=maxconn, **u)
    render("Caddyfile", rig / "Caddyfile", PORT=PORTS["caddy"], UPSTREAM_KEEPALIVE=keepalive, **u)
    # switchyard runs with its defaults (health checks included); only the
    # listen address is set, plus whatever GATEWAY_CONFIG_EXTRA adds.
    text = f'[gateway]\nlisten = "127.0.0.1:{PORTS["switchyard"]}"\n'
    if gateway_extra:
        text += "\n" + gateway_extra.rstrip("\n") + "\n"
    (rig / "gateway.toml").write_text(text)


def write_payloads(rig):
    www = rig / "www"
    (www / "files").mkdir(parents=True, exist_ok=True)
    (www / "post").write_text("the static handler refuses POST here\n")
    pattern = bytes(range(256))
    for w in WORKLOADS.values():
        if w.file_size:
            data = (pattern * (w.file_size // len(pattern) + 1))[:w.file_size]
            (www / w.path.lstrip("/")).write_bytes(data)
        if w.body_size:
            # wrk builds the request once from these (no Lua per request).
            (rig / f"{w.name}.lua").write_text(
                'wrk.method = "POST"\n'
                f'wrk.body = string.rep("x", {w.body_size})\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    for path in [www, *www.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def raise_nofile(conns):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = conns * 4 + 1024  # a proxy holds a client and an upstream socket per connection, plus slack
    if hard != resource.RLIM_INFINITY and hard < need:
        raise RigError(f"--conns {conns} needs about {need} open files per process; the hard limit is {hard} "
                       f"(raise it, e.g. `ulimit -Hn {need}` as root, or use fewer connections)")
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by everything started


def tool_versions(gateway_bin):
    def run(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        m = re.search(r"\d+\.\d+[\w.+~-]*", r.stdout + r.stderr)
        return m.group() if m else "?"
    v = {"nginx": run(["nginx", "-v"]), "haproxy": run(["haproxy", "-v"]), "caddy": run(["caddy", "version"]),
         "wrk": run(["wrk", "-v"])}
    if gateway_bin:
        v["switchyard"] = run([gateway_bin, "--version"])
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        v["switchyard_source"] = rev or "?"
    except OSError:
        pass
    return v


# ---------------------------------------------------------------- requests

def url(name, workload):
    path = workload.path if name == "direct" else PREFIX + workload.path
    return f"http://127.0.0.1:{PORTS[name]}{path}"


def one_request(name, workload, rig):
    """(status, body) of one request of the workload, or (None, error text)."""
    data = b"x" * workload.body_size if workload.body_size else None
    req = urllib.request.Request(url(name, workload), data=data, method="POST" if data else "GET")
    if data:
        req.add_header("Content-Type", "application/octet-stream")
    if workload.close:
        req.add_header("Connection", "close")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return None, str(e).encode()


def answer_ok(workload, rig, status, body):
    if status is None or not 200 <= status < 300:
        return False
    if workload.file_size:
        return body == (rig / "www" / workload.path.lstrip("/")).read_bytes()
    if workload.body_size:
        return body == b"ok\n"
    return body.startswith(b"hello")


def check_answers(names, workload, scenario, rig, procs):
    """Before measuring: each proxy answers the workload with the right 2xx
    answer. In error500 one instance of three answers 500, which a proxy may
    pass on, so there one good answer of six is enough."""
    tries = 6 if scenario == "error500" else 3
    report = []
    for n in names:
        got = [one_request(n, workload, rig) for _ in range(tries)]
        good = sum(answer_ok(workload, rig, s, b) for s, b in got)
        codes = " ".join(str(s) if s else "err" for s, _ in got)
        if good == 0 or (scenario != "error500" and good < tries):
            bad = next((s, b) for s, b in got if not answer_ok(workload, rig, s, b))
            raise RigError(f"{n} does not answer {workload.name} properly (statuses {codes}; one bad answer: "
                           f"{bad[0]} {bad[1][:200]!r})\n--- {n} log:\n{procs.log_tail(n)}")
        report.append(f"{n} {codes}")
    print(f"  checked {workload.name}: " + ", ".join(report), flush=True)


def check_upstream_reads_body(port, size):
    """The /post answer must come after the whole body and keep the
    connection: send half a body, expect silence, send the rest, expect 200,
    then a second request on the same connection."""
    with socket.create_connection(("127.0.0.1", port), 2) as s:
        head = f"POST /post HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n\r\n".encode()
        s.sendall(head + b"x" * (size // 2))
        s.settimeout(0.3)
        try:
            early = s.recv(200)
            raise RigError(f"instance on {port} answered before the whole body was sent: {early!r}")
        except socket.timeout:
            pass
        s.settimeout(5)
        s.sendall(b"x" * (size - size // 2))
        for attempt in (1, 2):
            buf = b""
            while b"\r\n\r\nok\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise RigError(f"instance on {port} closed the connection after POST {attempt}: {buf!r}")
                buf += chunk
            if not buf.startswith(b"HTTP/1.1 200") or b"connection: close" in buf.lower():
                raise RigError(f"instance on {port}: unexpected answer to POST: {buf!r}")
            if attempt == 1:
                s.sendall(head + b"x" * size)


def register_switchyard():
    token = os.environ.get("SWITCHYARD_ADMIN_TOKEN", "")
    for port in UPSTREAM_PORTS:
        body = json.dumps({"name": "bench", "url": f"http://127.0.0.1:{port}"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{PORTS['switchyard']}/services", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            urllib.request.urlopen(req, timeout=5).read()
        except urllib.error.HTTPError as e:
            raise RigError(f"registering instance {port} with switchyard: {e.code} {e.read()[:300]!r}")


def upstream_accepts(rig):
    """Connections accepted so far by the live instances (stub_status, on a
    unix socket of each instance)."""
    total = 0
    for i in range(1, len(UPSTREAM_PORTS) + 1):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(rig / f"upstream{i}.status.sock"))
                s.sendall(b"GET /status HTTP/1.0\r\nHost: rig\r\n\r\n")
                buf = b""
                while chunk := s.recv(4096):
                    buf += chunk
        except OSError:
            continue  # the dead instance
        body = buf.split(b"\r\n\r\n", 1)[1].decode().splitlines()
        total += int(body[2].split()[0]) - 1  # minus this connection
    return total


# ---------------------------------------------------------------- wrk

def wrk(procs, rig, name, workload, seconds, conns, threads, timeout):
    # wrk leaves answers slower than its timeout out of the latency figures.
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--timeout", f"{timeout}s", "--latency"]
    if workload.body_size:
        cmd += ["-s", str(rig / f"{workload.name}.lua")]
    if workload.close:
        cmd += ["-H", "Connection: close"]
    cmd.append(url(name, workload))
    out_path = rig / "logs" / "wrk.out"
    p = procs.start("wrk", cmd)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    procs.live.pop("wrk", None)
    out = out_path.read_text(errors="replace")
    m_rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    m_total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if p.returncode != 0 or not m_rps or not m_total:
        raise RigError(f"wrk against {name} failed (exit {p.returncode}):\n{out[-2000:]}")
    rps, total = float(m_rps.group(1)), int(m_total.group(1))

    def lat(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[m.group(2)] if m else float("nan")

    m_non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m_non2xx.group(1)) if m_non2xx else 0
    sock = {}
    m_sock = re.search(r"Socket errors: (.*)", out)
    if m_sock:
        sock = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", m_sock.group(1))}
    return {"rps": rps, "ok_rps": rps * (1 - non2xx / total) if total else 0.0, "p50": lat(50), "p99": lat(99),
            "requests": total, "non2xx": non2xx, "sock_errors": sum(sock.values()), "sock_detail": sock,
            "wrk_cpu_s": usage.ru_utime + usage.ru_stime}


# ---------------------------------------------------------------- one workload x scenario

def start_all(procs, rig, names, gateway_bin):
    caddy_home = rig / "caddy"
    caddy_home.mkdir(exist_ok=True)
    cmds = {
        "nginx": ["nginx", "-p", str(rig), "-e", str(rig / "logs" / "nginx.err"), "-c", str(rig / "nginx.conf"),
                  "-g", "daemon off;"],
        "haproxy": ["haproxy", "-db", "-f", str(rig / "haproxy.cfg")],
        "caddy": ["caddy", "run", "--config", str(rig / "Caddyfile"), "--adapter", "caddyfile"],
        "switchyard": [gateway_bin, "--config", str(rig / "gateway.toml")],
    }
    for i, port in enumerate(UPSTREAM_PORTS, 1):
        name = f"upstream{i}"
        # A killed instance (scenario dead) leaves its status socket behind,
        # and nginx does not listen on an existing one.
        (rig / f"{name}.status.sock").unlink(missing_ok=True)
        p = procs.start(name, ["nginx", "-p", str(rig), "-e", str(rig / "logs" / f"{name}.err"),
                               "-c", str(rig / f"{name}.conf"), "-g", "daemon off;"])
        if not wait_port(port, proc=p):
            raise RigError(f"{name} did not start:\n{procs.log_tail(name)}")
    for n in names:
        if n == "direct":
            continue
        env = {"XDG_CONFIG_HOME": str(caddy_home), "XDG_DATA_HOME": str(caddy_home)} if n == "caddy" else None
        p = procs.start(n, cmds[n], env)
        if not wait_port(PORTS[n], proc=p):
            raise RigError(f"{n} did not start:\n{procs.log_tail(n)}")
    if "switchyard" in names:
        register_switchyard()


def measure(procs, rig, names, workload, scenario, a, threads):
    write_configs(rig, scenario, a.conns, os.environ.get("GATEWAY_CONFIG_EXTRA", ""))
    print(f"\n== workload {workload.name} ({workload.what}), scenario {scenario}", flush=True)
    try:
        start_all(procs, rig, names, a.gateway_bin)
        if workload.body_size:
            check_upstream_reads_body(UPSTREAM_PORTS[0], workload.body_size)
        check_answers(names, workload, scenario, rig, procs)
        for n in names:  # warm-up
            wrk(procs, rig, n, workload, a.warmup, a.conns, threads, a.timeout)
        procs.check_alive()
        if scenario == "dead":
            procs.stop("upstream2", sig=signal.SIGKILL)
        upstream_sids = [p.pid for k, p in procs.live.items() if k.startswith("upstream")]
        rounds = {n: [] for n in names}
        for r in range(a.rounds):
            for n in names:
                sid = procs.live[n].pid if n != "direct" else None
                acc0 = upstream_accepts(rig)
                cpu0 = cpu_seconds(sid) if sid else 0.0
                up0 = sum(cpu_seconds(s) for s in upstream_sids)
                res = wrk(procs, rig, n, workload, a.seconds, a.conns, threads, a.timeout)
                cpu1 = cpu_seconds(sid) if sid else 0.0
                up1 = sum(cpu_seconds(s) for s in upstream_sids)
                acc1 = upstream_accepts(rig)
                req = res["requests"]
                per_req = lambda x, unit: x / req * unit if req else None
                res["cpu_us"] = per_req(cpu1 - cpu0, 1e6) if sid else None
                res["upstream_cpu_us"] = per_req(up1 - up0, 1e6)
                res["wrk_cpu_us"] = per_req(res.pop("wrk_cpu_s"), 1e6)
                res["upstream_conns_per_kreq"] = per_req(acc1 - acc0, 1000)
                if not req:
                    print(f"  {n}: no request completed in {a.seconds}s; a longer --seconds may help", flush=True)
                res["rss_mb"] = memory_kib(sid)[1] / 1024 if sid else None
                rounds[n].append(res)
                procs.check_alive()
                print(f"  round {r + 1}/{a.rounds} {n:10} {res['rps']:9.0f} req/s  p99 {res['p99']:7.2f} ms"
                      + (f"  non-2xx {res['non2xx']}" if res["non2xx"] else "")
                      + (f"  socket errors {res['sock_detail']}" if res["sock_errors"] else ""), flush=True)
        peaks = {n: memory_kib(procs.live[n].pid)[0] / 1024 for n in names if n != "direct"}
    finally:
        procs.stop_all()
    return [summarize(workload.name, scenario, n, rounds[n], peaks.get(n)) for n in names]


def summarize(workload, scenario, proxy, rs, peak_mb):
    def med(key):
        xs = [r[key] for r in rs if r[key] is not None]
        return statistics.median(xs) if xs else None
    s = {"workload": workload, "scenario": scenario, "proxy": proxy}
    for k in ("rps", "ok_rps", "p50", "p99", "cpu_us", "upstream_cpu_us", "wrk_cpu_us", "upstream_conns_per_kreq",
              "rss_mb"):
        s[k] = med(k)
    s["peak_rss_mb"] = peak_mb
    s["requests"] = sum(r["requests"] for r in rs)
    s["non2xx"] = sum(r["non2xx"] for r in rs)
    s["sock_errors"] = sum(r["sock_errors"] for r in rs)
    s["sock_detail"] = [r["sock_detail"] for r in rs if r["sock_errors"]]
    s["rounds"] = rs
    return s


def ratios(results):
    """switchyard against the peer with the most 2xx req/s, and its p99
    against the lowest p99 of any peer, per workload and scenario."""
    out = []
    keys = list(dict.fromkeys((r["workload"], r["scenario"]) for r in results))
    for w, sc in keys:
        rows = {r["proxy"]: r for r in results if (r["workload"], r["scenario"]) == (w, sc)}
        peers = [rows[p] for p in PEERS if p in rows]
        g = rows.get("switchyard")
        if not g or not peers:
            continue
        best = max(peers, key=lambda r: r["ok_rps"])
        answered = [r for r in peers if r["ok_rps"] > 0] or peers  # a peer that served nothing has no p99
        fast = min(answered, key=lambda r: r["p99"])
        div = lambda x, y: x / y if y else float("nan")
        out.append({"workload": w, "scenario": sc, "best_peer": best["proxy"],
                    "ok_rps_ratio": div(g["ok_rps"], best["ok_rps"]), "p99_ratio": div(g["p99"], best["p99"]),
                    "lowest_p99_peer": fast["proxy"], "p99_vs_lowest_ratio": div(g["p99"], fast["p99"])})
    return out


# ---------------------------------------------------------------- output

def opt(x, spec):
    return format("-", ">" + re.match(r"\d*", spec).group()) if x is None else format(x, spec)


def print_table(results):
    hdr = (f"{'workload':9} {'scenario':9} {'proxy':10} {'req/s':>9} {'2xx req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
           f"{'non-2xx':>8} {'sock err':>8} {'CPU us/req':>10} {'RSS MB':>7} {'peak MB':>7} "
           f"{'up us/req':>9} {'wrk us/req':>10} {'up conn/kreq':>12}")
    print(hdr)
    for r in results:
        print(f"{r['workload']:9} {r['scenario']:9} {r['proxy']:10} {r['rps']:9.0f} {r['ok_rps']:9.0f} "
              f"{r['p50']:7.2f} {r['p99']:7.2f} {r['non2xx']:8d} {r['sock_errors']:8d} {opt(r['cpu_us'], '10.1f')} "
              f"{opt(r['rss_mb'], '7.1f')} {opt(r['peak_rss_mb'], '7.1f')} {opt(r['upstream_cpu_us'], '9.1f')} "
              f"{opt(r['wrk_cpu_us'], '10.1f')} {opt(r['upstream_conns_per_kreq'], '12.2f')}")
    for r in results:
        for i, d in enumerate(r["sock_detail"]):
            print(f"  {r['workload']} {r['scenario']} {r['proxy']}: socket errors {d}")


def print_ratios(rats):
    for q in rats:
        print(f"{q['workload']} {q['scenario']}: switchyard / best peer ({q['best_peer']}): "
              f"2xx req/s {q['ok_rps_ratio']:.3f}, p99 {q['p99_ratio']:.3f}; "
              f"p99 / lowest peer p99 ({q['lowest_p99_peer']}): {q['p99_vs_lowest_ratio']:.3f}")


def markdown(results, rats):
    n = lambda x: f"{x:,.0f}".replace(",", " ")
    lines = ["| workload | scenario | proxy | req/s | 2xx req/s | p50 ms | p99 ms | non-2xx | CPU us/req | peak RSS MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    prev = None
    for r in results:
        key = (r["workload"], r["scenario"])
        w, sc = key if key != prev else ("", "")
        prev = key
        cells = [DISPLAY[r["proxy"]], n(r["rps"]), n(r["ok_rps"]), f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                 str(r["non2xx"]), opt(r["cpu_us"], ".1f"), opt(r["peak_rss_mb"], ".1f")]
        if r["proxy"] == "switchyard":
            cells = [f"**{c}**" for c in cells]
        lines.append("|" + "|".join(f" {c} " if c else " " for c in [w, sc] + cells) + "|")
    if rats:
        lines += ["", "| workload | scenario | best peer | switchyard 2xx req/s ratio | switchyard p99 ratio "
                      "| p99 / lowest peer p99 |", "|---|---|---|---:|---:|---:|"]
        for q in rats:
            lines.append(f"| {q['workload']} | {q['scenario']} | {DISPLAY[q['best_peer']]} | {q['ok_rps_ratio']:.2f} "
                         f"| {q['p99_ratio']:.2f} | {q['p99_vs_lowest_ratio']:.2f} ({DISPLAY[q['lowest_p99_peer']]}) |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description="switchyard side by side with nginx, HAProxy and Caddy (see README.md)")
    ap.add_argument("--workload", "--workloads", dest="workloads", default="hello",
                    help=f"comma-separated, of: {', '.join(WORKLOADS)} (default hello)")
    ap.add_argument("--all", action="store_true", help="every workload")
    ap.add_argument("--scenario", default="healthy",
                    help="comma-separated, of: healthy (three good instances), dead (instance 2 killed after "
                         "warm-up), error500 (instance 2 answers 500); or all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="length of one measured wrk run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of wrk per proxy before measuring")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=10, help="wrk's timeout in seconds: slower answers count as "
                                                            "timeouts, not in the latency figures (default 10)")
    ap.add_argument("--threads", type=int, default=0, help="wrk threads (default: one per 256 connections, "
                                                           "at most one per core)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(PROXIES)}")
    ap.add_argument("--json", default="", help="write the summary here")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for a look")
    a = ap.parse_args()
    a.workloads = list(WORKLOADS) if a.all else [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in a.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    a.scenarios = list(SCENARIOS) if a.scenario == "all" else [s.strip() for s in a.scenario.split(",")]
    for s in a.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}, all")
    a.names = [n for n in PROXIES if not a.only or n in a.only.split(",")]
    unknown = set(filter(None, a.only.split(","))) - set(PROXIES)
    if unknown:
        ap.error(f"unknown proxy {', '.join(sorted(unknown))}; known: {', '.join(PROXIES)}")
    if a.rounds < 1 or a.seconds < 1 or a.conns < 1:
        ap.error("--rounds, --seconds and --conns must be at least 1")
    a.gateway_bin = os.environ.get("GATEWAY_BIN") or str(REPO / "target" / "release" / "switchyard")
    return a


def main():
    a = parse_args()
    threads = a.threads or max(1, min(os.cpu_count() or 1, a.conns // 256))
    if threads > a.conns:
        sys.exit("rig: --threads must not exceed --conns")

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(signal.Signals(sig).name)
    # Ctrl-C, kill and a closed terminal all end in the clean-up below (set
    # explicitly: a shell without job control starts background jobs with
    # SIGINT ignored).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    procs, rig = None, None
    try:
        if "switchyard" in a.names and not os.access(a.gateway_bin, os.X_OK):
            raise RigError(f"no switchyard binary at {a.gateway_bin}: run `cargo build --release` in {REPO}, "
                           f"set GATEWAY_BIN, or leave it out with --only")
        for tool in ["nginx", "wrk"] + [t for t in ("haproxy", "caddy") if t in a.names]:
            if not shutil.which(tool):
                raise RigError(f"{tool} not found (Debian: apt-get install -y nginx haproxy caddy wrk)")
        busy = [f"{port} ({what})" for what, port in
                [(f"upstream{i}", p) for i, p in enumerate(UPSTREAM_PORTS, 1)]
                + [(n, PORTS[n]) for n in a.names if n != "direct"] if not port_free(port)]
        if busy:
            raise RigError(f"port in use: {', '.join(busy)}. Another rig still running? "
                           f"Stop whatever listens there (ss -ltnp) and try again.")
        raise_nofile(a.conns)
        rig = Path(tempfile.mkdtemp(prefix="switchyard-rig-"))
        # Run as root, nginx's workers run as an unprivileged user: they must
        # be able to read the files and write the temp dir.
        rig.chmod(0o755)
        (rig / "logs").mkdir()
        (rig / "tmp").mkdir()
        (rig / "tmp").chmod(0o1777)
        write_payloads(rig)
        procs = Procs(rig)
        versions = tool_versions(a.gateway_bin if "switchyard" in a.names else None)
        print(f"rig: {a.rounds} rounds x {a.seconds}s, {a.conns} conns, {threads} wrk thread(s), "
              f"{os.cpu_count()} cores; " + "; ".join(f"{k}: {v}" for k, v in versions.items()), flush=True)
        results = []
        for scenario in a.scenarios:
            for w in a.workloads:
                rows = measure(procs, rig, a.names, WORKLOADS[w], scenario, a, threads)
                results += rows
                print(f"-- {w} {scenario}: medians of {a.rounds} rounds x {a.seconds}s, {a.conns} conns")
                print_table(rows)
                print_ratios(ratios(rows))
        rats = ratios(results)
        if len(a.workloads) * len(a.scenarios) > 1:
            print(f"\n== all: medians of {a.rounds} rounds x {a.seconds}s, {a.conns} conns, {threads} wrk thread(s)")
            print_table(results)
            print_ratios(rats)
        if a.markdown:
            print()
            print(markdown(results, rats))
        if a.json:
            meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "rounds": a.rounds, "seconds": a.seconds, "conns": a.conns, "wrk_threads": threads,
                    "cores": os.cpu_count(), "kernel": os.uname().release, "versions": versions,
                    "gateway_config_extra": os.environ.get("GATEWAY_CONFIG_EXTRA", "")}
            with open(a.json, "w") as fh:
                json.dump({"meta": meta, "results": results, "ratios": rats}, fh, indent=1)
                fh.write("\n")
    except RigError as e:
        print(f"rig: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"rig: interrupted ({str(e) or 'SIGINT'}); stopping everything it started", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if procs:
            procs.stop_all()
        if rig:
            if a.keep_tmp:
                print(f"rig: kept {rig}", file=sys.stderr)
            else:
                shutil.rmtree(rig, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
