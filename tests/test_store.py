"""State store (§4.1): the memory store and a real redis-server: versions, compare-and-set, atomic updates, clear errors."""
import threading, time
import redis
import numpy as np
import pytest
from rapo_nb.store import (MemoryStateStore, RedisStateStore, StoreUnavailable, VersionConflict, connect_redis, decode_array,
                           encode_array, make_store)


def test_array_codec_round_trip_and_damage():
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    np.testing.assert_array_equal(decode_array(encode_array(x)), x)
    with pytest.raises(ValueError, match="payload has"): decode_array(encode_array(x)[:-1])
    with pytest.raises(ValueError, match="bad magic"): decode_array(b"nope")


def test_memory_store_cas_and_atomic_update():
    s = MemoryStateStore()
    assert s.put("bank", {"P": np.ones(2)}) == 1
    with pytest.raises(VersionConflict): s.put("bank", {"P": np.ones(2)}, expected_version=0)
    ts = [threading.Thread(target=lambda: [s.update("n", lambda a: {"n": a.get("n", np.zeros(1)) + 1}) for _ in range(50)]) for _ in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert float(s.get("n")[1]["n"][0]) == 200


@pytest.mark.redis
def test_redis_store_roundtrip_versions_and_cas(redis_url):
    s = RedisStateStore(redis_url)
    assert s.get("bank") == (0, {})
    P = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    M = np.full((5, 3, 2), 0.5, np.float16)
    assert s.put("bank", {"P": P, "M": M}) == 1
    ver, arrays = s.get("bank")
    assert ver == 1 and arrays["P"].dtype == np.float32 and arrays["M"].dtype == np.float16
    np.testing.assert_array_equal(arrays["P"], P); np.testing.assert_array_equal(arrays["M"], M)
    with pytest.raises(VersionConflict, match="expected version 0, found 1"): s.put("bank", {"P": P}, expected_version=0)
    assert s.put("bank", {"P": P * 2}, expected_version=1) == 2
    assert set(s.get("bank")[1]) == {"P"}            # a write replaces the whole bundle
    raw = s.client.hget(f"{s.prefix}:bank", "a:P")    # stored as binary with a header, not pickled
    assert raw.startswith(b"RAPOARR1")


@pytest.mark.redis
def test_redis_update_is_atomic_under_concurrent_writers(redis_url):
    stores = [RedisStateStore(redis_url) for _ in range(4)]
    def bump(a): return {"n": a.get("n", np.zeros(1, np.int64)) + 1}
    ts = [threading.Thread(target=lambda s=s: [s.update("counter", bump) for _ in range(40)]) for s in stores]
    for t in ts: t.start()
    for t in ts: t.join()
    ver, arrays = stores[0].get("counter")
    assert int(arrays["n"][0]) == 160 and ver == 160      # no lost update even though writers conflicted


def test_unreachable_redis_names_host_and_port_quickly():
    import socket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0)); port = sk.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"): RedisStateStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    assert time.monotonic() - t0 < 3.0


def test_unroutable_redis_gives_up_after_the_bounded_timeout():
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"10\.255\.255\.1:6390"): connect_redis("redis://10.255.255.1:6390/0", timeout_s=0.3)
    assert time.monotonic() - t0 < 3.0


@pytest.mark.redis
def test_make_store_from_config(redis_url):
    from rapo_nb.config import load_config
    assert isinstance(make_store(load_config("quick")), MemoryStateStore)
    cfg = load_config("quick", overrides={"runtime.store": "redis", "runtime.redis_url": redis_url})
    assert isinstance(make_store(cfg), RedisStateStore)


def test_retries_back_off_and_then_name_the_url():
    "Bounded retries: waits double up to the cap; after the last one a StoreUnavailable names the URL (no password)."
    from rapo_nb.store import call_with_retries
    waits, calls = [], []
    def flaky():
        calls.append(1)
        if len(calls) < 3: raise redis.exceptions.ConnectionError("Connection refused")
        return "ok"
    assert call_with_retries(flaky, "bank write", "redis://u:secret@h:1/0", 5, 0.1, 0.15, sleep=waits.append) == "ok"
    assert waits == [0.1, 0.15] and len(calls) == 3
    waits.clear()
    def down(): raise redis.exceptions.ConnectionError("Connection refused")
    with pytest.raises(StoreUnavailable) as e:
        call_with_retries(down, "bank write", "redis://u:secret@h:1/0", 3, 0.1, 1.0, sleep=waits.append)
    assert waits == [0.1, 0.2, 0.4] and "redis://h:1/0" in str(e.value) and "secret" not in str(e.value)
    assert "bank write" in str(e.value) and "4 attempts" in str(e.value)
    with pytest.raises(ValueError, match="wrong"):                       # not a connection error: not retried
        call_with_retries(lambda: (_ for _ in ()).throw(ValueError("wrong")), "x", "redis://h:1/0", 3, 0.1, 1.0,
                          sleep=waits.append)


@pytest.mark.redis
def test_redis_store_reconnects_after_a_restart(tmp_path):
    "A store write fails while redis-server is down and succeeds on the same client once it is back (no new store)."
    from conftest import start_redis
    proc, url = start_redis(tmp_path)
    store = RedisStateStore(url, timeout_s=0.5)
    store.put("k", {"x": np.arange(3)})
    proc.kill(); proc.wait(timeout=10)
    with pytest.raises((redis.exceptions.ConnectionError, OSError)): store.put("k", {"x": np.arange(4)})
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proc, _ = start_redis(tmp_path, port=port)
    try:
        assert store.put("k", {"x": np.arange(5)}) == 1                 # a fresh server: version starts again
        assert store.get("k")[1]["x"].tolist() == [0, 1, 2, 3, 4]
    finally:
        proc.kill(); proc.wait(timeout=10)
