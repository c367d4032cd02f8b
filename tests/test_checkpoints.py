"""Checkpoints: one format (tensors + JSON, SHA-256, atomic), retention of valid files, nothing executed on load."""
import hashlib, json, os, pickle, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from rapo_nb.checkpoints import (MAGIC, CheckpointError, atomic_write, checkpoint_paths, load_latest_checkpoint, read_checkpoint,
                                 save_numbered_checkpoint, verify_checkpoint, write_checkpoint)


def save_checkpoint(d, it, state, keep=3):
    return save_numbered_checkpoint(d, it, state, "test", keep=keep)


def test_corrupt_checkpoint_refused_previous_kept(tmp_path):
    for it in (10, 20): save_checkpoint(tmp_path, it, {"it": it})
    newest = checkpoint_paths(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"): read_checkpoint(newest)
    assert load_latest_checkpoint(tmp_path) == (10, {"it": 10})


def test_round_trip_of_nested_state(tmp_path):
    state = {"P": torch.randn(4, 3), "M": torch.rand(2, 2, dtype=torch.float64).half(), "ids": np.arange(5),
             "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3}]},
             "records": [{"conv_id": "c1", "ok": True, "t": 0.1 + 0.2}], "none": None, "nan": float("nan")}
    back = read_checkpoint(write_checkpoint(tmp_path / "x.rapo", state, "test"), "test")
    torch.testing.assert_close(back["P"], state["P"], rtol=0, atol=0)
    assert back["M"].dtype == torch.float16 and np.array_equal(back["ids"], state["ids"])
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999) and 0 in back["opt"]["state"]
    assert back["records"] == state["records"] and back["none"] is None and np.isnan(back["nan"])


def test_unstorable_objects_refused_naming_where(tmp_path):
    with pytest.raises(CheckpointError, match=r"state\.engine"): write_checkpoint(tmp_path / "x.rapo", {"engine": object()}, "test")
    assert not (tmp_path / "x.rapo").exists()


def test_kind_is_checked(tmp_path):
    p = write_checkpoint(tmp_path / "x.rapo", {"a": 1}, "orchestrator")
    with pytest.raises(CheckpointError, match="orchestrator checkpoint, not a transition-model"): read_checkpoint(p, "transition-model")


def test_corrupt_files_do_not_count_toward_checkpoints_kept(tmp_path):
    for it in (1, 2, 3): save_checkpoint(tmp_path, it, {"it": it}, keep=2)
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-000000000002.rapo", "ckpt-000000000003.rapo"]
    newest = checkpoint_paths(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:-1])
    save_checkpoint(tmp_path, 4, {"it": 4}, keep=2)
    # 4 and 2 are the two newest valid ones; the corrupt 3 is skipped (kept for inspection), not counted
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-000000000002.rapo", "ckpt-000000000003.rapo", "ckpt-000000000004.rapo"]
    newest4 = checkpoint_paths(tmp_path)[-1]
    newest4.write_bytes(b"garbage")
    assert load_latest_checkpoint(tmp_path) == (2, {"it": 2})


class _Evil:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["raw pickle", "pickle behind a valid header and checksum", "torch.save zip"])
def test_malicious_pickle_in_the_folder_is_never_executed(tmp_path, how):
    marker = tmp_path / "PWNED"
    save_checkpoint(tmp_path, 1, {"it": 1})
    evil = pickle.dumps({"it": _Evil(marker)})
    if how == "torch.save zip":
        import io
        bio = io.BytesIO(); torch.save({"it": _Evil(marker)}, bio); evil = bio.getvalue()
    if how == "pickle behind a valid header and checksum":
        header = json.dumps({"kind": "test", "sha256": hashlib.sha256(evil).hexdigest(), "bytes": len(evil)})
        evil = MAGIC + header.encode() + b"\n" + evil
    (tmp_path / "ckpt-000000000009.rapo").write_bytes(evil)
    with pytest.raises(CheckpointError): read_checkpoint(tmp_path / "ckpt-000000000009.rapo")
    assert load_latest_checkpoint(tmp_path) == (1, {"it": 1})      # the newest valid one wins
    save_checkpoint(tmp_path, 2, {"it": 2})                           # pruning verifies without decoding
    assert not marker.exists()


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    p = atomic_write(tmp_path / "f.bin", b"old")
    code = ("import os, sys; from pathlib import Path; from rapo_nb.checkpoints import atomic_write\n"
            "def w(t):\n    Path(t).write_bytes(b'half'); os._exit(9)\n"
            f"atomic_write(Path({str(p)!r}), w)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 9 and p.read_bytes() == b"old"


def test_training_and_runtime_share_the_format(tmp_path):
    from rapo_nb.config import load_config
    from rapo_nb.training import model_from_config, save_checkpoint as save_model
    cfg = load_config("quick")
    p = save_model(model_from_config(cfg, 0, "cpu"), tmp_path / "tm.pt", cfg, seed=0)
    assert p.read_bytes().startswith(MAGIC) and verify_checkpoint(p)["kind"] == "transition-model"


def test_corrupt_high_numbered_file_never_evicts_new_valid_ones(tmp_path):
    "Issue 22: a damaged ckpt-999… is skipped; new valid checkpoints are kept (and win), however low their number."
    (tmp_path / "ckpt-999999999999.rapo").write_bytes(b"RAPO-CHECKPOINT v2\n{damaged")
    (tmp_path / "ckpt-notanumber.rapo").write_bytes(b"junk")          # not a series name: ignored, never parsed
    for it in (1, 2, 3): save_checkpoint(tmp_path, it, {"it": it}, keep=2)
    names = [p.name for p in checkpoint_paths(tmp_path)]
    assert names == ["ckpt-000000000002.rapo", "ckpt-000000000003.rapo", "ckpt-999999999999.rapo"]
    assert load_latest_checkpoint(tmp_path) == (3, {"it": 3})


def test_a_folder_of_only_corrupt_checkpoints_cannot_be_resumed(tmp_path):
    "Issue 22: files that are all damaged are not 'no checkpoint' (which would silently start again from 0)."
    assert load_latest_checkpoint(tmp_path) is None                 # empty: a fresh start
    assert load_latest_checkpoint(tmp_path / "missing") is None
    for it in (1, 2): save_checkpoint(tmp_path, it, {"it": it})
    for p in checkpoint_paths(tmp_path): p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"cannot resume: none of the 2 checkpoint files in .* is valid"):
        load_latest_checkpoint(tmp_path)
