"""Shared fixtures: a real redis-server on a free loopback port, and output folders that never touch figures/."""
import os, shutil, socket, subprocess, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    "A free TCP port on 127.0.0.1."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "redis: needs a redis-server binary (skipped, with a reason, without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    "Every test writes figures and results under tmp_path, never into the committed figures/."
    monkeypatch.setenv("RAPO_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("RAPO_RESULTS_DIR", str(tmp_path / "results"))


def start_redis(tmp_path: Path, port: int | None = None, persist: bool = False):
    """Start redis-server on a free port (or `port`: a restart on the same port); return (process, url).
    `persist`: an append-only file fsynced on every write, in tmp_path, so a restarted server has every acknowledged write."""
    exe = shutil.which("redis-server")
    if exe is None: pytest.skip("redis-server not installed (apt-get install redis-server); Redis tests skipped")
    port = port or free_port()
    aof = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            if client.ping(): break
        except redis.exceptions.ConnectionError: time.sleep(0.05)
    else:
        proc.kill(); pytest.fail(f"redis-server did not answer on 127.0.0.1:{port}")
    return proc, f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def redis_url(tmp_path):
    "URL of a fresh redis-server started for this test and stopped by its pid afterwards."
    proc, url = start_redis(tmp_path)
    yield url
    proc.kill(); proc.wait(timeout=10)


@pytest.fixture(scope="module")
def one_torch_thread():
    "Small tensors: one torch thread avoids OpenMP oversubscription on a shared 2-core machine; restored afterwards."
    import torch
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
