"""How fast do status and list calls answer while a model trains? (issue: training as background jobs)

Starts `llm-mcp serve` over stdio, loads the built-in tiny model, starts a long training job, and times
N calls each of qloraevolved_training_status, qloraevolved_list_jobs and qloraevolved_list_models while it
runs, then cancels it. Prints a Markdown table; with --record appends it, with the command and machine, to
docs/benchmarks.md.

    .venv/bin/python benchmarks/status_latency.py [--calls 200] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mcp import Client, StdioServerParameters

from llm_mcp.dev.bench_records import benchmarks_file, record
from llm_mcp.dev.tiny import demo_records, make_tiny_model


async def measure(calls: int) -> list[tuple[str, list[float], int]]:
    work = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    model = make_tiny_model(work / "tiny")
    exe = str(Path(sys.executable).with_name("llm-mcp"))
    async with Client(StdioServerParameters(command=exe, args=["serve", "--workspace", str(work)])) as client:
        await client.call_tool("qloraevolved_load_model", {"model_name": str(model), "model_id": "bench",
                                                           "compute_dtype": "float32", "lora_rank": 16})
        started = await client.call_tool("qloraevolved_train", {
            "model_id": "bench", "train_dataset": demo_records(), "wait_seconds": 0,
            "training_config": {"max_steps": 100_000, "batch_size": 8, "gradient_accumulation_steps": 1,
                                "logging_steps": 1, "save_steps": 100_000, "report_to": "none",
                                "use_gradient_checkpointing": False, "output_dir": "bench-run"}})
        job_id = started.structured_content["job_id"]
        while (await client.call_tool("qloraevolved_training_status", {"job_id": job_id})).structured_content[
                "step"] < 5:
            await asyncio.sleep(0.2)
        results = []
        for tool, args in (("qloraevolved_training_status", {"job_id": job_id}), ("qloraevolved_list_jobs", {}),
                           ("qloraevolved_list_models", {})):
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                answer = await client.call_tool(tool, args)
                times.append((time.perf_counter() - t0) * 1000)
                assert not answer.is_error
            results.append((tool, times, 0))
        final = await client.call_tool("qloraevolved_training_status", {"job_id": job_id})
        steps = final.structured_content["step"]
        await client.call_tool("qloraevolved_cancel_training", {"job_id": job_id})
        while (await client.call_tool("qloraevolved_training_status", {"job_id": job_id})).structured_content[
                "state"] == "running":
            await asyncio.sleep(0.2)
    return [(tool, times, steps) for tool, times, _ in results]


def table(results: list[tuple[str, list[float], int]]) -> str:
    rows = ["| call (while training) | calls | median ms | p95 ms | max ms |", "| --- | --- | --- | --- | --- |"]
    for tool, times, _ in results:
        p95 = sorted(times)[int(0.95 * (len(times) - 1))]
        rows.append(f"| {tool} | {len(times)} | {statistics.median(times):.2f} | {p95:.2f} | {max(times):.2f} |")
    rows.append(f"\nThe job was at step {results[0][2]} when the timing ended (it kept training throughout).")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args()
    text = table(asyncio.run(measure(args.calls)))
    print(text)
    if args.record:
        machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}"
        command = f".venv/bin/python benchmarks/status_latency.py --calls {args.calls} --record"
        record(benchmarks_file(None), "Status latency during training",
               f"Command: `{command}`; transport stdio; machine: {machine}, no "
                                                  f"GPU; the model trains in its worker process meanwhile.\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
