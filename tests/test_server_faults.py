"""Faults around the server: a full job store, a server killed or stopped by a signal during training, calls that
queue on a busy model, and secrets kept out of logs. Loopback only; each case bounded in time.

Every case checks the same promises: a clear error or a true end state, the server alive (or restarted cleanly),
nothing already written lost, no orphan process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import (EXE, FAST_LOAD, FAST_TRAIN, McpSession, poll_job, server_config, wait_for, wait_for_step,
                      worker_pids)
from llm_mcp.jobs import ends
from llm_mcp.jobs.store import JobStore
from llm_mcp.server.app import create_server

TOKEN = "s3cret-token-for-logs-0123456789"
LONG_RUN = {**FAST_TRAIN, "max_steps": 400, "save_steps": 5, "logging_steps": 1, "batch_size": 2}


# -- the job store on a full disk ---------------------------------------------------------------------------------
def _fill(store: JobStore) -> None:
    """SQLite answers 'database or disk is full' once the file may not grow: a full disk, deterministically."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def _free(store: JobStore) -> None:
    store._db.execute("PRAGMA max_page_count = 1073741823")


def test_job_end_survives_a_full_job_store(tmp_path):
    """With the store full, progress is dropped without an error, the end is kept in memory (status and list show
    it, never 'running'), a new job is refused as DiskFull naming the state folder, and once space returns the end
    is written and survives a reopen."""
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    job = store.create(model_id="m", family="qloraevolved", config={}, output_dir="out", log_path=None)
    store.transition(job.job_id, "running")
    for n in range(200):  # fill the pages the job table has left
        store.record_progress(job.job_id, step=n, total_steps=10, loss=1.0, learning_rate=None, epoch=None,
                              eval_loss=None, checkpoint=None)
    _fill(store)
    for n in range(200, 400):  # would grow the file: dropped, no error
        store.record_progress(job.job_id, step=n, total_steps=10, loss=1.0, learning_rate=None, epoch=None,
                              eval_loss=None, checkpoint=None)
    blob = "x" * 200_000  # a result too large for the pages left
    ended = store.transition(job.job_id, "failed", error="worker failed: " + blob)
    assert store.is_pending(job.job_id)  # the database refused it: held in memory
    assert ended.state == "failed" and store.get(job.job_id).state == "failed"
    assert store.settle(job.job_id, "lost").state == "failed" and store.is_pending(job.job_id)  # never overwritten
    assert [r.state for r in store.list()] == ["failed"]
    with pytest.raises(Exception) as refused:
        store.create(model_id="m", family="qloraevolved", config={"pad": blob}, output_dir="out", log_path=None)
    assert type(refused.value).__name__ == "DiskFull" and str(tmp_path / "state") in str(refused.value)
    _free(store)
    store.flush_pending()
    assert not store.is_pending(job.job_id)
    store.close()
    reopened = JobStore(tmp_path / "state" / "jobs.sqlite")
    assert reopened.get(job.job_id).state == "failed"
    assert reopened.get(job.job_id).error.startswith("worker failed")


def test_restart_reads_the_end_the_worker_recorded(tmp_path):
    """A job left 'running' by a dead server takes the end its worker wrote to the job-end file (here: cancelled
    with a checkpoint at step 12); without such a file it is failed with a resume hint."""
    state = tmp_path / "state"
    store = JobStore(state / "jobs.sqlite")
    recorded = store.create(model_id="m", family="qloraevolved", config={}, output_dir="out", log_path=None)
    silent = store.create(model_id="m2", family="qloraevolved", config={}, output_dir="out2", log_path=None)
    for job in (recorded, silent):
        store.transition(job.job_id, "running")
    store._db.execute("UPDATE jobs SET server_pid = 999999999")  # a server that is gone
    assert ends.write(state, recorded.job_id, state="cancelled", result={"status": "cancelled", "global_step": 12},
                      step=12, last_checkpoint="/ws/out/checkpoint-10")
    store.close()

    store = JobStore(state / "jobs.sqlite")
    assert store.recover_after_restart() == 2
    after = store.get(recorded.job_id)
    assert (after.state, after.step, after.last_checkpoint) == ("cancelled", 12, "/ws/out/checkpoint-10")
    assert after.result["global_step"] == 12
    assert not ends.path_of(state, recorded.job_id).exists()  # consumed
    assert store.get(silent.job_id).state == "failed" and "server stopped" in store.get(silent.job_id).error


# -- the server dies, or is stopped, during training --------------------------------------------------------------
def test_server_killed_mid_training_loses_at_most_a_step(tmp_path, tiny_model, demo_rows, http_server):
    """kill -9 of the server while it trains: the worker finishes its step, saves a checkpoint and the adapter,
    records the end and exits (no orphan); the next server reports the job's true end, and resume continues."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    server = http_server("--workspace", str(workspace), "--allow-read", str(tiny_model.parent))
    with McpSession(server.url) as mcp:
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "doomed", **FAST_LOAD})
        job = mcp.ok("qloraevolved_train", {"model_id": "doomed", "train_dataset": demo_rows, "wait_seconds": 0,
                                            "training_config": {**LONG_RUN, "output_dir": "run"}})["job_id"]
        wait_for_step(mcp, job, 7, timeout=120)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    wait_for(lambda: not worker_pids("doomed", any_parent=True), "the orphaned worker to save and exit", 60)
    assert (workspace / "run" / "final" / "adapter_model.safetensors").is_file()

    with McpSession(create_server(server_config(workspace, tiny_model))) as mcp:
        [record] = mcp.ok("qloraevolved_list_jobs")["jobs"]
        assert record["job_id"] == job and record["state"] == "cancelled", record
        assert record["last_checkpoint"] and Path(record["last_checkpoint"]).is_dir()
        assert record["step"] >= 7
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "again", **FAST_LOAD})
        resumed = mcp.ok("qloraevolved_train", {"model_id": "again", "train_dataset": demo_rows,
                                                "resume_from_checkpoint": True, "wait_seconds": -1,
                                                "training_config": {**LONG_RUN, "max_steps": record["step"] + 6,
                                                                    "output_dir": "run"}})
        assert resumed["status"] == "success" and resumed["resumed_from"]
        assert resumed["global_step"] == record["step"] + 6


class _StdioPeer:
    """A bare JSON-RPC peer on `llm-mcp serve`'s stdin/stdout (the SDK's client hides the server's pid, and this
    test must signal that process)."""

    def __init__(self, args: list[str], stderr: Path) -> None:
        with open(stderr, "ab") as err:
            self.proc = subprocess.Popen([str(EXE), "serve", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        self._id = 0
        self.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                    "clientInfo": {"name": "fault-test", "version": "0"}})
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: dict) -> dict:
        self._id += 1
        self._send({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params})
        while True:
            line = self.proc.stdout.readline()
            assert line, "the server closed its stdout"
            message = json.loads(line)
            if message.get("id") == self._id:
                assert "error" not in message, message
                return message["result"]

    def tool(self, name: str, arguments: dict) -> dict:
        result = self.request("tools/call", {"name": name, "arguments": arguments})
        assert not result.get("isError"), result
        return result["structuredContent"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stdio_server_stops_trainings_on_a_signal(tmp_path, tiny_model, demo_rows, signum):
    """SIGTERM or SIGINT to a stdio server during training: the training stops at a step with a checkpoint and the
    adapter, the job ends 'cancelled' saying a shutdown stopped it, and the server and its worker exit within
    seconds, without waiting for stdin to close."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    peer = _StdioPeer(["--workspace", str(workspace), "--allow-read", str(tiny_model.parent)], tmp_path / "err.log")
    try:
        peer.tool("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "sig", **FAST_LOAD})
        job = peer.tool("qloraevolved_train", {"model_id": "sig", "train_dataset": demo_rows, "wait_seconds": 0,
                                               "training_config": {**LONG_RUN, "output_dir": "run"}})["job_id"]
        wait_for(lambda: peer.tool("qloraevolved_training_status", {"job_id": job})["step"] >= 3,
                 "a few training steps", 120)
        peer.proc.send_signal(signum)
        assert peer.proc.wait(60) == 0  # stdin is still open: the server exits on its own
    finally:
        if peer.proc.poll() is None:
            peer.proc.kill()
    wait_for(lambda: not worker_pids("sig", any_parent=True), "the worker to exit", 30)
    stderr = (tmp_path / "err.log").read_text()
    assert "Traceback" not in stderr, stderr[-3000:]
    store = JobStore(workspace / ".llm-mcp" / "jobs.sqlite")
    record = store.get(job)
    assert record.state == "cancelled" and "shutdown" in record.error, record
    assert record.last_checkpoint and Path(record.last_checkpoint).is_dir()
    assert (workspace / "run" / "final" / "adapter_model.safetensors").is_file()


# -- calls wait their turn ---------------------------------------------------------------------------------------
def test_concurrent_generate_calls_queue_instead_of_bouncing(mcp, tiny_model):
    """Six generate calls at once on one model all answer (in turn), the same greedy text each time."""
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "queue", **FAST_LOAD})

    async def together():
        calls = [mcp.client.call_tool("qloraevolved_generate", {"model_id": "queue", "prompt": "The capital of",
                                                                "max_new_tokens": 24}) for _ in range(6)]
        return await asyncio.gather(*calls)

    results = mcp.run(together())
    assert all(not r.is_error for r in results), [r.content for r in results if r.is_error]
    texts = {r.structured_content["text"] for r in results}
    assert len(texts) == 1
    mcp.ok("qloraevolved_unload_model", {"model_id": "queue"})


# -- secrets -----------------------------------------------------------------------------------------------------
def test_token_never_reaches_a_log(tmp_path, tiny_model, http_server):
    """With access logging on (--log-level DEBUG), a token sent in a query string, a wrong bearer token and the
    right one leave no trace of the token in the server's output or any file of its state folder."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    log = tmp_path / "server.log"
    server = http_server("--workspace", str(workspace), "--allow-read", str(tiny_model.parent), "--log-level",
                         "DEBUG", log=log, env={"LLM_MCP_TOKEN": TOKEN})
    initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}).encode()

    def post(query: str, bearer: str | None) -> int:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        request = urllib.request.Request(f"{server.url}{query}", data=initialize, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status
        except urllib.error.HTTPError as refused:
            return refused.code

    assert post(f"?token={TOKEN}", None) == 401
    assert post(f"?access_token={TOKEN}&x=1", f"{TOKEN}x") == 401
    assert post(f"?token={TOKEN}", TOKEN) == 200  # the right header: served, and logged without the query
    server.stop()  # its output is complete once it has exited
    output = log.read_text(errors="replace")
    assert "/mcp?<redacted>" in output  # the access log ran, with the query string removed
    leaks = [str(p) for p in [log, *workspace.rglob("*")] if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_a_full_disk_is_named_as_such_wherever_it_is_met(monkeypatch):
    """What a worker meets as ENOSPC in other words (a load error that blamed model_name, errno 28, and torch's
    short write where the disk is nearly full) reaches the agent as DiskFull naming the folder; a short write on a
    disk with room, and other errors, pass unchanged."""
    from llm_mcp import disk
    from llm_mcp.errors import DiskFull, InvalidArgument
    from llm_mcp.workers.worker import _as_disk_full

    blamed = InvalidArgument("model_name", "m", "a local model folder ([Errno 28] No space left on device)")
    torn = RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 1234 vs 1200")
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 10 << 30)  # plenty of room
    assert _as_disk_full(torn, "/ws/out") is torn
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 4096)  # nearly full
    for exc in (blamed, torn, OSError(28, "No space left on device", "/ws/out/x.bin")):
        error = _as_disk_full(exc, "/ws/out")
        assert isinstance(error, DiskFull) and "disk full" in str(error) and "/ws/out" in str(error)
    other = ValueError("bad value")
    assert _as_disk_full(other, "/ws/out") is other


# -- a workspace that fills up ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs as the workspace (mounting needs root: CI runs as root; skipped where it is refused)."""
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(root)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _fill_disk(folder: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the file system holding folder."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        try:
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave + len(chunk):
                f.write(chunk)
                f.flush()
            f.write(b"\0" * max(0, os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize - leave))
            f.flush()
        except OSError:  # already full
            pass
    return filler


def test_a_full_workspace_fails_the_run_clearly_and_keeps_what_was_written(small_disk, tiny_model, demo_rows):
    """A run into a workspace that fills mid-run ends 'failed' with a DiskFull message naming the folder (never
    'running', never a raw torch error); the checkpoints completed before stay readable, no torn one is left; the
    server and the model stay up, and once space is freed the same model trains again."""
    with McpSession(create_server(server_config(small_disk, tiny_model))) as mcp:
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "full", **FAST_LOAD})
        job = mcp.ok("qloraevolved_train", {"model_id": "full", "train_dataset": demo_rows, "wait_seconds": 0,
                                            "training_config": {**LONG_RUN, "output_dir": "run"}})["job_id"]
        wait_for_step(mcp, job, 1, checkpoint=True, timeout=120)
        filler = _fill_disk(small_disk, leave=64 * 1024)
        status = poll_job(mcp, job, timeout=120)
        assert status["state"] == "failed" and "disk full" in status["error"], status
        assert str(small_disk / "run") in status["error"]
        checkpoints = sorted((small_disk / "run").glob("checkpoint-*"))
        assert checkpoints, "the checkpoint completed before the disk filled was lost"
        for checkpoint in checkpoints:  # every checkpoint left is complete
            assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] > 0
        assert mcp.ok("qloraevolved_list_models")["models"]["full"]["state"] in ("ready", "prepared")
        filler.unlink()
        again = mcp.ok("qloraevolved_train", {"model_id": "full", "train_dataset": demo_rows, "wait_seconds": -1,
                                              "training_config": {**LONG_RUN, "max_steps": 6, "output_dir": "run2"}})
        assert again["status"] == "success"
        assert [j["state"] for j in mcp.ok("qloraevolved_list_jobs")["jobs"]] == ["failed", "succeeded"]


def test_cancel_while_the_dataset_is_read_ends_the_job_at_once(mcp, tiny_model, workspace):
    """cancel_training right after train starts on a large file: the job ends 'cancelled' (reading and tokenizing
    stop, or the first step does), and the model is free for the next call."""
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "reader", **FAST_LOAD})
    big = workspace / "big.jsonl"
    row = json.dumps({"prompt": "Q: what is the capital of France?\nA:", "completion": " Paris."}) + "\n"
    big.write_text(row * 200_000)
    job = mcp.ok("qloraevolved_train", {"model_id": "reader", "train_dataset": str(big), "wait_seconds": 0,
                                        "training_config": {**FAST_TRAIN, "max_steps": 1000, "output_dir": "read"}})
    mcp.ok("qloraevolved_cancel_training", {"job_id": job["job_id"]})
    status = poll_job(mcp, job["job_id"], timeout=300)
    # The cancel arrives before the run starts, while 200,000 rows are read or tokenized (it stops there, step 0),
    # or at the latest at the end of the step under way once reading is done (a fast machine); it never runs on.
    # Only a cancel that interrupted reading leaves an error, and that error says so.
    assert status["state"] == "cancelled" and status["step"] <= 1, status
    assert status["error"] is None or "stopped" in status["error"], status
    assert mcp.ok("qloraevolved_generate", {"model_id": "reader", "prompt": "Hi", "max_new_tokens": 2})["text"] is not None
    mcp.ok("qloraevolved_unload_model", {"model_id": "reader"})


def test_a_dead_servers_job_waits_for_its_worker_to_finish_saving(tmp_path):
    """After a server died, a restart does not settle a job whose worker is still saving (it would record an older
    checkpoint and lose the end); once that worker has gone, status settles it from the end the worker wrote."""
    from llm_mcp.jobs.manager import JobManager

    state = tmp_path / "state"
    saving = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "llm_mcp.workers.worker"])
    try:
        store = JobStore(state / "jobs.sqlite")
        job = store.create(model_id="m", family="qloraevolved", config={}, output_dir="out", log_path=None,
                           worker_pid=saving.pid)
        store.transition(job.job_id, "running")
        store._db.execute("UPDATE jobs SET server_pid = 999999999")  # its server is gone
        store.close()
        store = JobStore(state / "jobs.sqlite")
        assert store.recover_after_restart() == 0
        manager = JobManager(store)
        assert manager.find(family="qloraevolved", model_id=None, job_id=job.job_id).state == "running"
        ends.write(state, job.job_id, state="cancelled", result={"status": "cancelled"}, step=9,
                   last_checkpoint="/ws/out/checkpoint-8")
    finally:
        saving.kill()
        saving.wait()
    settled = manager.find(family="qloraevolved", model_id=None, job_id=job.job_id)
    assert (settled.state, settled.step, settled.last_checkpoint) == ("cancelled", 9, "/ws/out/checkpoint-8")


def test_a_job_store_on_a_full_disk_says_so(small_disk):
    """A server whose state folder's disk is full refuses to start with DiskFull naming the folder, not a bare
    'disk I/O error'."""
    from llm_mcp.errors import DiskFull

    (small_disk / "state").mkdir()
    _fill_disk(small_disk, leave=0)
    with pytest.raises(DiskFull, match="disk full") as refused:
        JobStore(small_disk / "state" / "jobs.sqlite")
    assert str(small_disk / "state") in str(refused.value)
