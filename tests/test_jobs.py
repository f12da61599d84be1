"""Training as a background job: running -> succeeded by polling, cancel with a checkpoint, busy refusal,
a worker killed mid-run then resumed, history kept across a server restart, the loss plot as a PNG."""

from __future__ import annotations

import base64
import io
import os
import signal

import pytest

from conftest import (FAST_LOAD, FAST_TRAIN, HW, McpSession, job_status, poll_job, server_config, wait_for,
                      wait_for_step, worker_pids)
from llm_mcp.jobs.store import JobStore
from llm_mcp.server.app import create_server

LONG = {**FAST_TRAIN, "max_steps": 100_000, "save_steps": 10, "logging_steps": 5}


@pytest.fixture(scope="module")
def model(mcp, tiny_model):
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "jobs", **FAST_LOAD})
    return "jobs"


def test_long_run_answers_running_then_succeeds_by_polling(mcp, model, demo_rows):
    """A run that has not ended within wait_seconds (0 here: at once, whatever the hardware's speed) answers
    'running' with a job_id; polling the status tool shows the step rising and reaches 'succeeded' with the spec's
    final answer. (The progress notifications of a waiting call: test_train.py and test_stdio.py.)"""
    answer = mcp.ok("qloraevolved_train", {"model_id": model, "train_dataset": demo_rows, "wait_seconds": 0,
                                           "training_config": {**FAST_TRAIN, "max_steps": 600, "logging_steps": 1,
                                                               "output_dir": "long"}})
    assert answer["status"] == "running" and answer["job_id"].startswith("j-")
    assert "qloraevolved_training_status" in answer["message"]
    wait_for_step(mcp, answer["job_id"], 1)
    running = mcp.ok("qloraevolved_training_status", {"model_id": model})
    assert running["job_id"] == answer["job_id"] and running["total_steps"] == 600
    steps: list[int] = []

    def ended() -> dict | None:
        status = job_status(mcp, answer["job_id"])
        steps.append(status["step"])
        return status if status["state"] in ("succeeded", "failed", "cancelled") else None

    done = wait_for(ended, lambda: f"job {answer['job_id']} to end (steps seen: {steps[-5:]})", timeout=600)
    assert done["state"] == "succeeded", done["error"]
    assert steps == sorted(steps) and any(0 < s < 600 for s in steps), steps  # progress seen while it ran
    assert done["step"] == 600 and done["result"]["status"] == "success"
    assert done["result"]["output_dir"] == "long/final" and "train_loss" in done["result"]["metrics"]
    assert len(done["recent_losses"]) == 10 and done["loss"] < 0.5  # converged on the tiny data


def test_busy_model_refuses_a_second_run_and_cancel_saves_a_checkpoint(mcp, model, demo_rows, workspace):
    """While a job runs, a second train (and unload) is refused naming the job; cancel stops it at a step
    boundary with a checkpoint on disk and state 'cancelled'."""
    answer = mcp.ok("qloraevolved_train", {"model_id": model, "train_dataset": demo_rows, "wait_seconds": 0,
                                           "training_config": {**LONG, "output_dir": "cancel-me"}})
    job_id = answer["job_id"]
    wait_for_step(mcp, job_id, 10, checkpoint=True)
    text = mcp.error("qloraevolved_train", {"model_id": model, "train_dataset": demo_rows,
                                            "training_config": {"output_dir": "other"}})
    assert "busy" in text and job_id in text and "qloraevolved_cancel_training" in text
    assert job_id in mcp.error("qloraevolved_unload_model", {"model_id": model})
    cancel = mcp.ok("qloraevolved_cancel_training", {"job_id": job_id})
    assert cancel["state"] == "cancelling"
    done = poll_job(mcp, job_id)
    assert done["state"] == "cancelled", done
    assert done["last_checkpoint"].endswith(f"checkpoint-{done['step']}")
    assert os.path.isdir(done["last_checkpoint"])
    again = mcp.ok("qloraevolved_cancel_training", {"job_id": job_id})
    assert "already ended" in again["message"]


def test_status_plot_is_a_png_image(mcp, model):
    """include_plot=true adds the loss curve as an image/png content item that decodes as a PNG."""
    from PIL import Image

    result = mcp.call("qloraevolved_training_status", {"model_id": model, "include_plot": True})
    assert not result.is_error
    images = [c for c in result.content if getattr(c, "type", "") == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    picture = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
    assert picture.format == "PNG" and picture.size[0] > 300
    plain = mcp.call("qloraevolved_training_status", {"model_id": model})
    assert [c.type for c in plain.content] == ["text"]


def test_killed_worker_fails_the_job_and_a_fresh_load_resumes(mcp, model, tiny_model, demo_rows):
    """kill -9 of the worker mid-training: the server answers, the job is failed with the reason, the model is
    lost; loading it again and training with resume_from_checkpoint=true finishes from the checkpoint."""
    answer = mcp.ok("qloraevolved_train", {"model_id": model, "train_dataset": demo_rows, "wait_seconds": 0,
                                           "training_config": {**LONG, "max_steps": 400, "output_dir": "crash"}})
    status = wait_for_step(mcp, answer["job_id"], 20, checkpoint=True)
    [pid] = worker_pids(model)
    os.kill(pid, signal.SIGKILL)
    failed = poll_job(mcp, answer["job_id"])
    assert failed["state"] == "failed" and "SIGKILL" in failed["error"]
    assert "lost" in mcp.ok("qloraevolved_list_models")["models"][model]["state"]
    checkpoint_step = int(failed["last_checkpoint"].rsplit("-", 1)[1])
    assert checkpoint_step >= status["step"] - 10

    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": model, **FAST_LOAD})
    resumed = mcp.ok("qloraevolved_train", {"model_id": model, "train_dataset": demo_rows, "wait_seconds": -1,
                                            "training_config": {**FAST_TRAIN, "max_steps": checkpoint_step + 20,
                                                                "save_steps": 10, "output_dir": "crash",
                                                                "resume_from_checkpoint": True}})
    assert resumed["status"] == "success" and resumed["global_step"] == checkpoint_step + 20
    # the latest complete checkpoint: the reported one, or one saved just before the kill (a folder the kill
    # left half-written is skipped)
    assert int(resumed["resumed_from"].rsplit("-", 1)[1]) >= checkpoint_step


def test_jobs_survive_a_server_restart(tmp_path, tiny_model, demo_rows):
    """A server stopped mid-run cancels the job with a checkpoint; a new server on the same workspace lists the
    job history, and resume continues the run."""
    config = server_config(tmp_path, tiny_model)
    with McpSession(create_server(config)) as first:
        first.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "r", **FAST_LOAD})
        done = first.ok("qloraevolved_train", {"model_id": "r", "train_dataset": demo_rows, "wait_seconds": -1,
                                               "training_config": {**FAST_TRAIN, "max_steps": 3, "output_dir": "a"}})
        started = first.ok("qloraevolved_train", {"model_id": "r", "train_dataset": demo_rows, "wait_seconds": 0,
                                                  "training_config": {**LONG, "output_dir": "b"}})
        wait_for_step(first, started["job_id"], 10, checkpoint=True)
    with McpSession(create_server(config)) as second:
        jobs = {j["job_id"]: j for j in second.ok("qloraevolved_list_jobs")["jobs"]}
        assert jobs[done["job_id"]]["state"] == "succeeded" and jobs[done["job_id"]]["final_dir"] == "a/final"
        stopped = jobs[started["job_id"]]
        assert stopped["state"] == "cancelled" and stopped["last_checkpoint"]
        step = int(stopped["last_checkpoint"].rsplit("-", 1)[1])
        second.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "r", **FAST_LOAD})
        resumed = second.ok("qloraevolved_train", {
            "model_id": "r", "train_dataset": demo_rows, "wait_seconds": -1,
            "training_config": {**FAST_TRAIN, "max_steps": step + 5, "output_dir": "b",
                                "resume_from_checkpoint": True}})
        assert resumed["global_step"] == step + 5


def test_store_marks_jobs_of_a_crashed_server_failed(tmp_path):
    """After a crash (no clean shutdown), jobs left queued/running are failed with a resume hint on restart."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(model_id="m", family="qloraevolved", config={}, output_dir="o", log_path=None)
    store.transition(job.job_id, "running")
    store.record_progress(job.job_id, step=30, total_steps=100, loss=1.0, learning_rate=1e-3, epoch=1.0,
                          eval_loss=None, checkpoint="/w/o/checkpoint-30")
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite")
    assert reopened.recover_after_restart() == 1
    record = reopened.get(job.job_id)
    assert record.state == "failed" and "checkpoint-30" in record.error and "resume_from_checkpoint" in record.error
    with pytest.raises(AssertionError, match="illegal transition"):
        reopened.transition(job.job_id, "running")


def test_two_models_train_at_once(mcp, tiny_model, demo_rows):
    """Two loaded models train side by side in their own workers: both runs make progress while the other still
    runs (neither waits for the other), and both stop cleanly when cancelled. On CPU they share the cores instead
    of contending for all of them."""
    for model_id in ("left", "right"):
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": model_id, **FAST_LOAD})
    jobs = [mcp.ok("qloraevolved_train", {"model_id": model_id, "train_dataset": demo_rows, "wait_seconds": 0,
                                          "training_config": {**LONG, "save_steps": 1000,
                                                              "output_dir": f"side-{model_id}"}})["job_id"]
            for model_id in ("left", "right")]
    try:
        for job_id in jobs:  # the runs never end by themselves: each one's steps are taken while the other runs
            wait_for_step(mcp, job_id, 5)
        assert [job_status(mcp, j)["state"] for j in jobs] == ["running", "running"]
    finally:
        for job_id in jobs:
            mcp.ok("qloraevolved_cancel_training", {"job_id": job_id})
    finals = [poll_job(mcp, job_id) for job_id in jobs]
    assert [f["state"] for f in finals] == ["cancelled", "cancelled"], finals
    if not HW.has_cuda and (os.cpu_count() or 1) > 1:  # CPU training shares the cores: the first gives up
        # threads when the second starts, the second starts with its share
        for final in finals:
            assert any(c.startswith("cpu threads:") for c in final["result"]["engine_choices"]), final["result"]
    listed = {j["job_id"]: j for j in mcp.ok("qloraevolved_list_jobs")["jobs"]}
    assert all(listed[j]["final_dir"].endswith("/final") for j in jobs)
