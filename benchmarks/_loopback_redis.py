"A throw-away redis-server on a free loopback port, shared by the benchmarks that need one."
from __future__ import annotations
import shutil, socket, subprocess, time


def free_port() -> int:
    "A TCP port free on 127.0.0.1 right now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmpdir: str) -> tuple[subprocess.Popen, str]:
    "Start redis-server on a free loopback port without persistence; return (process, url)."
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not installed (apt-get install redis-server): the benchmark needs it")
    import redis

    port = free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmpdir]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(200):
        try:
            if c.ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"redis-server did not answer on 127.0.0.1:{port}")
