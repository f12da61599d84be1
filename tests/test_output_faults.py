"""Faults around a run's output folder (issue 16): two models and one output_dir, another model's checkpoint,
checkpoints a crash left torn, a full disk.

Runs needing a worker go through the MCP client on the tiny model; the disk-full runs call the engine in this
process, where free space can be faked (or a real small tmpfs used, when this process may mount one).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST_LOAD, FAST_TRAIN, McpSession, poll_job, wait_for_step
from llm_mcp import disk, output_lock
from llm_mcp.errors import DiskFull, InvalidArgument, OutputDirBusy

# a run that lasts until cancelled, checkpointing often and keeping every checkpoint
ENDLESS = {**FAST_TRAIN, "max_steps": 100_000, "save_steps": 5, "save_total_limit": 1000}
SEAL = ".complete"


def train(mcp: McpSession, model_id: str, rows: list, **config) -> dict:
    return mcp.ok("qloraevolved_train", {"model_id": model_id, "train_dataset": rows, "wait_seconds": -1,
                                         "training_config": {**FAST_TRAIN, **config}})


def train_error(mcp: McpSession, model_id: str, rows: list, **config) -> str:
    return mcp.error("qloraevolved_train", {"model_id": model_id, "train_dataset": rows, "wait_seconds": -1,
                                            "training_config": {**FAST_TRAIN, **config}})


@pytest.fixture(scope="module")
def models(mcp, tiny_model):
    """Two models of the same base: 'fa' with LoRA r=16, 'fb' with r=8."""
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "fa", **FAST_LOAD})
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "fb", **FAST_LOAD,
                                       "lora_rank": 8, "lora_alpha": 16})
    return "fa", "fb"


# -- one writer per output folder ----------------------------------------------------------------------------------

def test_a_folder_a_live_run_holds_is_refused_to_another_model(mcp, models, workspace, demo_rows):
    """While fa trains into 'shared', fb's training there is refused naming the holder, even with
    overwrite_output_dir=true, and fa's checkpoints stay; once fa's run ends its lock is gone and fb may use it."""
    first = mcp.ok("qloraevolved_train", {"model_id": "fa", "train_dataset": demo_rows, "wait_seconds": 0,
                                          "training_config": {**ENDLESS, "output_dir": "shared"}})
    try:
        wait_for_step(mcp, first["job_id"], 1, checkpoint=True)
        lock = workspace / ".shared.llm-mcp.lock"
        held = json.loads(lock.read_text())
        before = sorted((workspace / "shared").glob("checkpoint-*"))

        text = train_error(mcp, "fb", demo_rows, max_steps=2, output_dir="shared")
        assert "shared" in text and held["holder"] in text and f"pid {held['pid']}" in text
        assert "cancel" in text and "another output_dir" in text
        text = train_error(mcp, "fb", demo_rows, max_steps=2, output_dir="shared", overwrite_output_dir=True)
        assert held["holder"] in text
        assert all((p / SEAL).is_file() for p in before), "a checkpoint of the live run was touched"
        assert json.loads(lock.read_text())["pid"] == held["pid"]
    finally:
        mcp.ok("qloraevolved_cancel_training", {"job_id": first["job_id"]})
        assert poll_job(mcp, first["job_id"])["state"] == "cancelled"
    assert not lock.exists()
    again = train(mcp, "fb", demo_rows, max_steps=2, save_steps=2, output_dir="shared", overwrite_output_dir=True)
    assert again["status"] == "success" and not lock.exists()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    """A lock left by a process that ended (killed mid-run) is stale: the next claim takes it over."""
    folder = tmp_path / "run"
    code = (f"from llm_mcp import output_lock; import os; held = output_lock.claim({str(folder)!r}, 'gone', "
            "doing='training'); held.__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    lock = output_lock.lock_path(folder)
    assert json.loads(lock.read_text())["holder"] == "gone"
    with output_lock.claim(folder, "next", doing="training"):
        assert json.loads(lock.read_text())["holder"] == "next"
    assert not lock.exists()


def test_a_lock_is_released_when_the_run_fails(tmp_path):
    """An exception inside the claim releases it; a folder inside a held one is refused too."""
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with output_lock.claim(folder, "first", doing="training"):
            with pytest.raises(OutputDirBusy, match="inside"):
                with output_lock.claim(folder / "final", "export", doing="export"):
                    pass
            raise RuntimeError("boom")
    assert output_lock.live_holder(folder) is None and not output_lock.lock_path(folder).exists()


def test_another_hosts_lock_is_refused_with_how_to_clear_it(tmp_path):
    """A lock from another host cannot be checked from here: refused, naming the lock file to delete if that run
    is gone."""
    folder = tmp_path / "run"
    lock = output_lock.lock_path(folder)
    lock.write_text(json.dumps({"holder": "model x, job j-9", "pid": 1, "host": socket.gethostname() + "-other",
                                "since": time.time()}))
    with pytest.raises(OutputDirBusy) as err:
        with output_lock.claim(folder, "me", doing="training"):
            pass
    assert "model x, job j-9" in str(err.value) and str(lock) in str(err.value)


# -- resume --------------------------------------------------------------------------------------------------------

def test_resume_from_another_lora_shape_is_refused_naming_both(mcp, models, workspace, demo_rows):
    """fb (r=8) resuming fa's (r=16) checkpoint is refused naming both shapes; nothing in the folder changes."""
    train(mcp, "fa", demo_rows, max_steps=2, save_steps=2, output_dir="shape-a")
    out = workspace / "shape-a"
    before = sorted(p.name for p in out.iterdir())
    text = train_error(mcp, "fb", demo_rows, max_steps=4, output_dir="shape-a", resume_from_checkpoint=True)
    assert "resume_from_checkpoint" in text and "checkpoint-2" in text
    assert "r=16" in text and "r=8" in text and "tiny-llama" in text
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_skips_torn_checkpoints_and_names_them(mcp, models, workspace, demo_rows):
    """Beside the complete checkpoint-2: checkpoint-4 with a truncated adapter, checkpoint-6 without a seal,
    checkpoint-8 with an empty trainer_state.json. Naming a torn one is refused naming the file; resume=true
    continues from checkpoint-2, names each skipped one and why, and rotation never keeps a torn one."""
    train(mcp, "fa", demo_rows, max_steps=4, save_steps=2, output_dir="torn")
    out = workspace / "torn"
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    (out / "checkpoint-6" / SEAL).unlink()
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-8")
    (out / "checkpoint-8" / "trainer_state.json").write_text("")
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    text = train_error(mcp, "fa", demo_rows, max_steps=6, output_dir="torn",
                       resume_from_checkpoint="torn/checkpoint-4")
    assert "resume_from_checkpoint" in text and "adapter_model.safetensors" in text and "truncated" in text

    answer = train(mcp, "fa", demo_rows, max_steps=6, save_steps=2, save_total_limit=1, output_dir="torn",
                   resume_from_checkpoint=True)
    assert answer["resumed_from"].endswith("checkpoint-2") and answer["global_step"] == 6
    skipped = [w for w in answer["warnings"] if w.startswith("resume: skipped")]
    for name, why in (("checkpoint-4", "adapter_model.safetensors"), ("checkpoint-6", SEAL),
                      ("checkpoint-8", "trainer_state.json is empty")):
        assert any(name + ":" in w and why in w for w in skipped), (name, skipped)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]
    assert (out / "checkpoint-6" / SEAL).is_file()


def test_checkpoints_from_before_seals_count_when_readable(tmp_path):
    """A checkpoint without a seal, older than any sealed one, counts when its files read back."""
    import torch
    from safetensors.torch import save_file

    from llm_mcp.engine.train.checkpoints import resolve_resume

    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"w": torch.zeros(4, 4)}, str(folder / "adapter_model.safetensors"))
        torch.save({"state": {}}, folder / "optimizer.pt")
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"PK\x03\x04")  # cut short
    point = resolve_resume(tmp_path, True)
    assert point.path == str(tmp_path / "checkpoint-2")
    assert [c.path.name for c in point.torn] == ["checkpoint-4"] and "optimizer.pt" in point.torn[0].problem
    with pytest.raises(InvalidArgument, match="optimizer.pt"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-4"))


# -- a full disk ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tiny_model):
    """The tiny model loaded in this process, so that the engine's view of free space can be faked."""
    from llm_mcp.config import LoadConfig
    from llm_mcp.engine.load.model import load_model

    return load_model(LoadConfig(model_name=str(tiny_model), **FAST_LOAD))


def run_engine(bundle, out: Path, demo_rows, **config) -> dict:
    from llm_mcp.config import RunOptions, TrainingConfig
    from llm_mcp.engine.train.run import train as engine_train

    settings = {**FAST_TRAIN, "optim": "adamw_torch", "save_steps": 2, **config}
    return engine_train(bundle, TrainingConfig(output_dir=str(out), **settings), demo_rows, None, RunOptions(),
                        on_progress=lambda *a: None, should_stop=lambda: False, notes=[])


def leftovers(out: Path) -> list[str]:
    """Names beside and in `out` that a finished or failed run must not leave: temporary folders and its lock."""
    return [p.name for p in (*out.parent.iterdir(), *out.iterdir()) if ".tmp-" in p.name or ".old-" in p.name
            or p.name.endswith(output_lock.LOCK_SUFFIX)]


def test_a_checkpoint_that_would_not_fit_stops_the_run_with_disk_full(bundle, tmp_path, monkeypatch, demo_rows):
    """Free space that runs out after the first checkpoint: the run stops with DiskFull naming the folder, before
    writing checkpoint-4; checkpoint-2 stays complete, and no final folder, temporary folder or lock is left."""
    out = tmp_path / "full"
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 1024 if list(out.glob("checkpoint-*")) else 2**40)
    with pytest.raises(DiskFull) as err:
        run_engine(bundle, out, demo_rows, max_steps=6)
    assert str(out) in str(err.value) and "checkpoint-4" in str(err.value) and "1.0 KiB free" in str(err.value)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / SEAL).is_file() and not (out / "final").exists()
    assert leftovers(out) == []


def test_ENOSPC_in_torchs_words_mid_save_is_disk_full(bundle, tmp_path, monkeypatch, demo_rows):
    """torch.save failing on a full disk with its own words ('unexpected pos') in the middle of checkpoint-4:
    DiskFull naming the folder, the half-written checkpoint-4 removed, checkpoint-2 kept."""
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            Path(f).write_bytes(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    # torch's words say only that a write fell short: a full disk where the file system is nearly full (here: any
    # free space counts as nearly full), another failure elsewhere
    monkeypatch.setattr(disk, "_NEARLY_FULL_BYTES", 1 << 62)
    out = tmp_path / "cut"
    with pytest.raises(DiskFull) as err:
        run_engine(bundle, out, demo_rows, max_steps=6)
    assert str(out) in str(err.value)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"] and leftovers(out) == []
    monkeypatch.setattr(disk, "_NEARLY_FULL_BYTES", 0)  # a disk with room: not called full
    roomy = tmp_path / "roomy"
    with pytest.raises(RuntimeError, match="unexpected pos"):
        run_engine(bundle, roomy, demo_rows, max_steps=6)
    assert [p.name for p in roomy.glob("checkpoint-*")] == ["checkpoint-2"]


def test_a_run_whose_checkpoints_would_not_all_fit_warns_early(bundle, tmp_path, monkeypatch, demo_rows):
    """Room for one checkpoint at a time but not for the three the run keeps: a warning in the answer that names
    the folder and what to change; the run itself completes while space lasts."""
    from llm_mcp.engine.train.checkpoints import save_sizes

    sizes = save_sizes(bundle.model, bundle.tokenizer, "adamw_torch")
    room = disk.MARGIN_BYTES + 2 * (sizes.checkpoint + sizes.final)
    monkeypatch.setattr(disk, "free_bytes", lambda folder: room)
    out = tmp_path / "tight"
    answer = run_engine(bundle, out, demo_rows, max_steps=6, save_total_limit=3)
    assert answer["status"] == "success"
    assert any("disk space" in w and str(out) in w and "save_total_limit" in w for w in answer["warnings"])


def test_a_real_full_tmpfs_gives_disk_full_and_no_torn_checkpoint(bundle, tmp_path, monkeypatch, demo_rows):
    """On a small tmpfs (free space reported as ample, so the save itself meets the full disk): DiskFull naming
    the folder, only complete checkpoints left."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        monkeypatch.setattr(disk, "free_bytes", lambda folder: 2**40)
        out = mount / "run"
        with pytest.raises(DiskFull) as err:
            run_engine(bundle, out, demo_rows, max_steps=12)
        assert str(out) in str(err.value)
        from llm_mcp.engine.train.checkpoints import survey

        assert all(c.is_complete and (c.path / SEAL).is_file() for c in survey(out))
        assert not (out / "final").exists() and leftovers(out) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)
