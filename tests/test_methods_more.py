"""ORPO, KTO and GRPO through the MCP client: each trains and reports its own metrics, GRPO's mean reward rises
under a declared reward, the new row forms come through every source form, and bad specs are refused with the
server alive and the model kept."""

from __future__ import annotations

import json

from conftest import FAST_LOAD, FAST_TRAIN, write_jsonl

from test_methods import HELD_OUT, TRAIN

MODEL = "methods"
ORPO = {**FAST_TRAIN, "method": "orpo", "batch_size": 4, "logging_steps": 1, "max_steps": 8, "learning_rate": 1e-3}
KTO_ROWS = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in TRAIN] + \
           [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in TRAIN]
KTO = {**FAST_TRAIN, "method": "kto", "batch_size": 4, "logging_steps": 1, "max_steps": 8, "learning_rate": 1e-3}
# a toy task the tiny random model can learn by sampling: answer with a word that starts with a capital letter
GRPO_ROWS = [{"prompt": f"Name {t}.", "answer": "x"} for t in ("a cat", "a dog", "the sea", "a tree")]
CAPITAL = [{"type": "regex", "pattern": r"^\s*[A-Z]"}]
GRPO = {**FAST_TRAIN, "method": "grpo", "batch_size": 8, "gradient_accumulation_steps": 1, "logging_steps": 1,
        "max_steps": 40, "learning_rate": 1e-2, "num_generations": 8, "max_completion_length": 3,
        "rewards": CAPITAL}


def _load(mcp, tiny_model, model_id=MODEL):
    """The module's model, loaded once (each test trains its own output_dir on it)."""
    if model_id not in mcp.ok("qloraevolved_list_models")["models"]:
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": model_id, **FAST_LOAD})


def test_orpo_trains_pairs_and_reports_its_metrics(mcp, tiny_model):
    _load(mcp, tiny_model)
    before = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": HELD_OUT})
    trained = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": TRAIN, "method": "orpo",
                                            "wait_seconds": -1, "training_config": {**ORPO, "output_dir": "orpo"}})
    assert trained["status"] == "success" and trained["effective_config"]["method"] == "orpo"
    assert trained["effective_config"]["beta"] == 0.1  # TRL's default, resolved
    assert {"rewards/margins", "rewards/accuracies", "log_odds_ratio", "nll_loss"} <= set(trained["metrics"])
    assert trained["loss"]["last"] < trained["loss"]["first"]
    after = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": HELD_OUT})
    assert after["mean_margin"] > before["mean_margin"], (before, after)


def test_kto_trains_unpaired_rows_from_a_file_and_reports_its_metrics(mcp, tiny_model, workspace):
    _load(mcp, tiny_model)
    write_jsonl(workspace / "kto.jsonl", KTO_ROWS)
    shown = mcp.ok("inspect_dataset", {"dataset": "kto.jsonl"})
    assert shown["format"] == "unpaired" and "method='kto'" in shown["loss_on"] and shown["usable_rows"] == 20
    assert "desirable:" in shown["examples"][0]
    trained = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": "kto.jsonl", "wait_seconds": -1,
                                            "training_config": {**KTO, "output_dir": "kto"}})
    assert trained["status"] == "success" and trained["dataset"]["format"] == "unpaired"
    assert trained["effective_config"]["loss_type"] == "kto"
    assert {"rewards/chosen", "rewards/rejected", "kl"} <= set(trained["metrics"])
    status = mcp.ok("qloraevolved_training_status", {"job_id": trained["job_id"]})
    assert "rewards/chosen" in status["method_metrics"]
    # generate and resume after kto, as after sft
    assert mcp.ok("qloraevolved_generate", {"model_id": MODEL, "prompt": "Is a cat real?",
                                            "max_new_tokens": 4})["completion_tokens"] >= 1
    resumed = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": "kto.jsonl", "wait_seconds": -1,
                                            "training_config": {**KTO, "max_steps": 10, "save_steps": 4,
                                                                "output_dir": "kto", "resume_from_checkpoint": True}})
    assert resumed["resumed_from"].endswith("checkpoint-8") and resumed["global_step"] == 10


def test_grpo_raises_the_mean_reward_of_a_declared_regex_reward(mcp, tiny_model, workspace):
    _load(mcp, tiny_model)
    (workspace / "grpo").mkdir(exist_ok=True)
    (workspace / "grpo" / "rows.json").write_text(json.dumps(GRPO_ROWS))
    trained = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": "grpo/rows.json", "method": "grpo",
                                            "wait_seconds": -1, "training_config": {**GRPO, "output_dir": "grpo-out"}})
    assert trained["status"] == "success" and trained["dataset"]["format"] == "prompt_answer"
    assert trained["effective_config"]["rewards"][0]["type"] == "regex"
    assert "reward" in trained["metrics"] and "rewards/regex/mean" in trained["metrics"]
    rewards = [p["reward"] for p in mcp.ok("qloraevolved_training_status",
                                           {"job_id": trained["job_id"]})["recent_method_metrics"]]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10  # sampled: single steps are noisy
    assert last > first + 0.2, rewards
    png = mcp.call("qloraevolved_training_status", {"job_id": trained["job_id"], "include_plot": True})
    assert any(getattr(c, "type", "") == "image" for c in png.content)
    exported = mcp.ok("qloraevolved_export", {"model_id": MODEL, "format": "adapter", "output_dir": "grpo-adapter"})
    assert exported["status"] == "success"


def test_bad_method_settings_and_rows_are_refused_with_the_model_kept(mcp, tiny_model):
    _load(mcp, tiny_model, "strict")
    call = {"model_id": "strict", "wait_seconds": -1}
    text = mcp.error("qloraevolved_train", {**call, "train_dataset": GRPO_ROWS,
                                            "training_config": {**GRPO, "rewards": [{"type": "python",
                                                                                     "code": "import os"}]}})
    assert "rewards[0].type" in text and "exact_match" in text and "json_schema" in text
    text = mcp.error("qloraevolved_train", {**call, "train_dataset": GRPO_ROWS,
                                            "training_config": {**GRPO, "rewards": None}})
    assert "rewards" in text and "method='grpo'" in text
    text = mcp.error("qloraevolved_train", {**call, "train_dataset": GRPO_ROWS,
                                            "training_config": {**GRPO, "num_generations": 3}})
    assert "num_generations" in text and "divisor" in text
    text = mcp.error("qloraevolved_train", {**call, "train_dataset": GRPO_ROWS,
                                            "training_config": {**GRPO, "rewards": [{"type": "regex",
                                                                                     "pattern": "(("}]}})
    assert "rewards[0].pattern" in text
    text = mcp.error("qloraevolved_train", {**call, "train_dataset": TRAIN,
                                            "training_config": {**GRPO, "output_dir": "g-bad"}})
    assert "train_dataset" in text and "answer" in text
    text = mcp.error("qloraevolved_train", {**call, "train_dataset": KTO_ROWS[:3] + [
        {"prompt": "p", "completion": "c", "label": "yes"}], "training_config": {**KTO, "output_dir": "k-bad"}})
    assert "row 3" in text and "label" in text
    text = mcp.error("qloraevolved_train", {**call, "train_dataset": KTO_ROWS,
                                            "training_config": {**KTO, "loss_type": "sigmoid"}})
    assert "loss_type" in text and "apo_zero_unpaired" in text
    text = mcp.error("qloraevolved_train", {**call, "train_dataset": KTO_ROWS,
                                            "training_config": {**FAST_TRAIN, "output_dir": "s-bad"}})
    assert "method" in text and "'kto'" in text
    assert "strict" in mcp.ok("qloraevolved_list_models")["models"]
    assert mcp.ok("qloraevolved_generate", {"model_id": "strict", "prompt": "x", "max_new_tokens": 2})


def test_evaluate_reads_unpaired_rows_and_reference_answers(mcp, tiny_model):
    _load(mcp, tiny_model)
    unpaired = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": KTO_ROWS})
    assert unpaired["dataset_format"] == "unpaired" and unpaired["desirable_rows"] == 10 and unpaired["rows"] == 20
    assert unpaired["eval_loss"] > 0 and unpaired["undesirable_eval_loss"] > 0
    answers = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": GRPO_ROWS})
    assert answers["dataset_format"] == "prompt_answer" and answers["eval_loss"] > 0 and answers["rows"] == 4


CHAT_PAIRS = [{"prompt": [{"role": "user", "content": p["prompt"]}],
               "chosen": [{"role": "assistant", "content": p["chosen"]}],
               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in TRAIN]
CHAT_KTO = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]} for r in KTO_ROWS]
CHAT_GRPO = [{"messages": [{"role": "system", "content": "Answer in one word."},
                           {"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in GRPO_ROWS]
FORMS = {"preference": (TRAIN, CHAT_PAIRS), "unpaired": (KTO_ROWS, CHAT_KTO), "prompt_answer": (GRPO_ROWS, CHAT_GRPO)}


def test_every_new_row_form_reads_from_every_source(mcp, workspace):
    """Pairs, unpaired rows and prompts with answers, as text and as chat messages, are detected from inline rows,
    .jsonl, .json, .parquet, a save_to_disk folder and (text forms) .csv, with every row usable."""
    import datasets
    import pandas as pd

    folder = workspace / "forms"
    folder.mkdir(exist_ok=True)
    for fmt, (plain, chat) in FORMS.items():
        for shape, rows in (("plain", plain), ("chat", chat)):
            stem = folder / f"{fmt}-{shape}"
            write_jsonl(stem.with_suffix(".jsonl"), rows)
            stem.with_suffix(".json").write_text(json.dumps(rows))
            pd.DataFrame(rows).to_parquet(stem.with_suffix(".parquet"))
            datasets.Dataset.from_list(rows).save_to_disk(str(stem))
            sources = [rows] + [f"forms/{stem.name}{ext}" for ext in (".jsonl", ".json", ".parquet", "")]
            if shape == "plain":
                pd.DataFrame(rows).to_csv(stem.with_suffix(".csv"), index=False)
                sources.append(f"forms/{stem.name}.csv")
            for source in sources:
                shown = mcp.ok("inspect_dataset", {"dataset": source})
                where = source if isinstance(source, str) else "inline"
                assert shown["format"] == fmt and shown["usable_rows"] == len(rows), (fmt, shape, where, shown)
                assert not shown["problems"], (fmt, shape, where, shown["problems"])


def test_inspect_flags_rows_the_methods_cannot_use(mcp):
    """chosen == rejected, an empty side, a label that is no boolean, one kind of label only, an empty answer."""
    same = mcp.ok("inspect_dataset", {"dataset": TRAIN[:3] + [{"prompt": "q", "chosen": " A.", "rejected": " A."}]})
    assert any("chosen and rejected are the same answer" in p for p in same["problems"])
    empty = mcp.ok("inspect_dataset", {"dataset": TRAIN[:3] + [{"prompt": "q", "chosen": " A.", "rejected": ""}]})
    assert any("empty fields" in p for p in empty["problems"])
    label = mcp.ok("inspect_dataset", {"dataset": KTO_ROWS[:3] + [{"prompt": "q", "completion": "c", "label": 2}]})
    assert any("label" in p for p in label["problems"])
    one_kind = mcp.ok("inspect_dataset", {"dataset": KTO_ROWS[:5]})
    assert any("every row is labelled true" in p for p in one_kind["problems"])
    answers = mcp.ok("inspect_dataset", {"dataset": GRPO_ROWS + [{"prompt": "q", "answer": ""}]})
    assert any("empty fields" in p for p in answers["problems"])
