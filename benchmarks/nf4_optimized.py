"""Does nf4_optimized earn its name? Logit distance to the unquantized model: plain NF4 vs nf4_optimized.

On the tiny model with outlier weights (llm_mcp.dev.tiny.make_outlier_model), load it unquantized (bfloat16), as
plain NF4, and as nf4_optimized, run the same inputs, and compare each quantized model's logits with the
unquantized ones (mean absolute difference, and KL divergence of the next-token distributions).

    .venv/bin/python benchmarks/nf4_optimized.py [--budget 0.2] [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from llm_mcp.dev.bench_records import benchmarks_file, record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from llm_mcp.engine.load.sensitivity import logit_distances
    from llm_mcp.dev.tiny import make_outlier_model

    model_dir = make_outlier_model(Path(tempfile.mkdtemp()) / "outliers")
    from llm_mcp.dev.tiny import demo_records

    results = logit_distances(model_dir, args.budget, [r["prompt"] + r["completion"] for r in demo_records()[:8]])
    rows = ["| quant_type | mean abs logit diff vs bfloat16 | KL(next token) | linear weight bytes | kept in 16-bit |",
            "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['mean_abs_logit_diff']:.4f} | {r['kl']:.5f} | {r['linear_weight_bytes']} | "
                    f"{', '.join(r['kept']) or '-'} |")
    table = "\n".join(rows)
    print(table)
    if args.record:
        record(benchmarks_file(None), "nf4_optimized vs nf4 on a model with outlier weights",
               f"Command: `.venv/bin/python benchmarks/nf4_optimized.py --budget {args.budget} --record` (tiny "
               f"Llama from `llm_mcp.dev.tiny.make_outlier_model`: outliers x60 in two linear layers; 8 prompts; "
               f"CPU).\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
