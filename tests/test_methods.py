"""Training methods beyond SFT, through the MCP client: DPO on preference pairs {prompt, chosen, rejected} (the
base without the adapter as reference), its metrics, preference accuracy from *_evaluate (adapter and base), and
clear errors for data that does not fit the method."""

from __future__ import annotations

from conftest import FAST_LOAD, FAST_TRAIN

MODEL = "prefers"
THINGS = ["the sky", "the sea", "a cat", "a dog", "the moon", "a tree", "the sun", "a river", "a stone", "a bird",
          "a fish", "a car", "a song", "a cloud", "a hill", "a lamp"]
PAIRS = [{"prompt": f"Is {t} real?", "chosen": " Yes, it is.", "rejected": " No way."} for t in THINGS]
TRAIN, HELD_OUT = PAIRS[:10], PAIRS[10:]
DPO = {**FAST_TRAIN, "method": "dpo", "batch_size": 4, "logging_steps": 1, "max_steps": 12, "learning_rate": 1e-3}


def test_dpo_raises_the_preference_for_chosen_answers_on_held_out_pairs(mcp, tiny_model, demo_rows):
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": MODEL, **FAST_LOAD})
    before = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": HELD_OUT})
    assert before["dataset_format"] == "preference" and before["pairs"] == len(HELD_OUT)
    trained = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": TRAIN, "wait_seconds": -1,
                                            "training_config": {**DPO, "output_dir": "dpo-run"}})
    assert trained["status"] == "success" and trained["effective_config"]["method"] == "dpo"
    assert trained["dataset"]["loss_on"].startswith("preference pairs (chosen over rejected")
    assert trained["loss"]["last"] < trained["loss"]["first"]  # 0.693 = log 2 at the start: no preference yet
    assert trained["metrics"]["rewards/accuracies"] > 0.5 and trained["metrics"]["rewards/margins"] > 0
    after = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": HELD_OUT})
    assert after["preference_accuracy"] == 1.0 and after["used_adapter"] is True
    assert after["mean_margin"] > before["mean_margin"] + 1.0, (before, after)
    base = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": HELD_OUT, "use_adapter": False})
    assert base["used_adapter"] is False and abs(base["mean_margin"] - before["mean_margin"]) < 1e-3
    # generation and SFT evaluation go on after DPO
    assert mcp.ok("qloraevolved_generate", {"model_id": MODEL, "prompt": HELD_OUT[0]["prompt"],
                                            "max_new_tokens": 6})["completion_tokens"] >= 1
    assert mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": demo_rows[:4]})["eval_loss"] > 0


def test_data_that_does_not_fit_the_method_is_refused(mcp, tiny_model, demo_rows):
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "picky", **FAST_LOAD})
    text = mcp.error("qloraevolved_train", {"model_id": "picky", "train_dataset": demo_rows, "wait_seconds": -1,
                                            "training_config": {**DPO, "output_dir": "dpo-bad-1"}})
    assert "train_dataset" in text and "method='dpo'" in text and "chosen" in text
    text = mcp.error("qloraevolved_train", {"model_id": "picky", "train_dataset": TRAIN, "wait_seconds": -1,
                                            "training_config": {**FAST_TRAIN, "method": "sft",
                                                                "output_dir": "dpo-bad-2"}})
    assert "method" in text and "'dpo'" in text
    same = [*TRAIN[:3], {"prompt": "Is it?", "chosen": " Yes.", "rejected": " Yes."}]
    text = mcp.error("qloraevolved_train", {"model_id": "picky", "train_dataset": same, "wait_seconds": -1,
                                            "training_config": {**DPO, "output_dir": "dpo-bad-3"}})
    assert "row 3" in text and "chosen and rejected are the same answer" in text
    text = mcp.error("qloraevolved_train", {"model_id": "picky", "train_dataset": TRAIN,
                                            "training_config": {**DPO, "method": "ppo"}})
    assert "method" in text and "dpo" in text and "grpo" in text
    assert mcp.ok("qloraevolved_generate", {"model_id": "picky", "prompt": "x", "max_new_tokens": 2})


def test_inspect_shows_pairs_and_the_method_argument_trains_them(mcp, workspace, demo_rows):
    shown = mcp.ok("inspect_dataset", {"dataset": TRAIN, "model_id": MODEL})
    assert shown["format"] == "preference" and "method='dpo'" in shown["loss_on"]
    assert "chosen:  Yes, it is." in shown["examples"][0] and "rejected:  No way." in shown["examples"][0]
    assert shown["length_tokens"]["max"] > 0
    trained = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": TRAIN, "method": "dpo",
                                            "wait_seconds": -1,
                                            "training_config": {**DPO, "max_steps": 2, "output_dir": "dpo-arg"}})
    assert trained["effective_config"]["method"] == "dpo" and "rewards/margins" in trained["metrics"]
    # the reference adapter DPO trains against is gone afterwards: one adapter is saved, exported and trained on
    assert not (workspace / "dpo-arg" / "final" / "ref").exists()
    exported = mcp.ok("qloraevolved_export", {"model_id": MODEL, "format": "merged_16bit", "output_dir": "dpo-merged",
                                              "probe_prompt": HELD_OUT[0]["prompt"]})
    assert exported["status"] == "success" and exported["verified"]["loads_with_transformers"] is True
    sft = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": demo_rows, "method": "sft",
                                        "wait_seconds": -1, "training_config": {**FAST_TRAIN, "max_steps": 10,
                                                                                "output_dir": "after-dpo-sft"}})
    assert sft["effective_config"]["method"] == "sft" and sft["loss"]["last"] < sft["loss"]["first"]
