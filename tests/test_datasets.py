"""Dataset forms and row formats: unit tests of data/datasets.py, then each form through the train tool."""

from __future__ import annotations

import json

import pytest

from conftest import FAST_LOAD, FAST_TRAIN, write_jsonl
from llm_mcp.data.datasets import detect_format, prepare
from llm_mcp.errors import DatasetError
from llm_mcp.dev.tiny import CHAT_TEMPLATE, demo_messages_records

ALPACA = [{"instruction": "Name the capital of Zorbland.", "input": "", "output": "Blip."},
          {"instruction": "Translate to Wendish.", "input": "hello", "output": "Wendo."}]
SHAREGPT = [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]


@pytest.mark.parametrize(("columns", "expected"), [
    (["text"], "text"), (["prompt", "completion"], "prompt_completion"), (["instruction", "input", "output"], "alpaca"),
    (["messages"], "messages"), (["conversations"], "sharegpt"), (["question", "answer"], None),
])
def test_detect_format_from_columns(columns, expected):
    """Each supported row format is recognised from its columns; unknown columns are not guessed."""
    assert detect_format(columns) == expected


def test_file_forms_all_read(tmp_path, demo_rows):
    """.jsonl, .json, .csv, .parquet, .txt files and a save_to_disk folder all load into TRL's columns."""
    import datasets
    import pandas as pd

    write_jsonl(tmp_path / "d.jsonl", demo_rows)
    (tmp_path / "d.json").write_text(json.dumps(demo_rows))
    pd.DataFrame(demo_rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(demo_rows).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(demo_rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved"):
        got = prepare(str(tmp_path / name), dataset_format="auto", chat_template=None, param="train_dataset")
        assert got.source_format == "prompt_completion" and len(got.dataset) == len(demo_rows), name
        assert got.dataset[0] == demo_rows[0]
    (tmp_path / "d.txt").write_text("first line of text\nsecond line\n")
    got = prepare(str(tmp_path / "d.txt"), dataset_format="auto", chat_template=None, param="train_dataset")
    assert got.source_format == "text" and got.dataset["text"] == ["first line of text", "second line"]


def test_chat_formats_keep_assistant_only_loss_or_split():
    """Chat rows train on assistant turns: with generation markers via assistant_only_loss, without them as a
    conversational prompt/completion pair that TRL masks."""
    marked = prepare(demo_messages_records(), dataset_format="auto", chat_template=CHAT_TEMPLATE, param="d")
    assert marked.assistant_only_loss and marked.dataset.column_names == ["messages"]
    plain = prepare(demo_messages_records(), dataset_format="auto", chat_template="{{ x }}", param="d")
    assert not plain.assistant_only_loss and plain.dataset.column_names == ["prompt", "completion"]
    assert plain.dataset[0]["completion"][0]["role"] == "assistant"
    alpaca = prepare(ALPACA, dataset_format="auto", chat_template=CHAT_TEMPLATE, param="d")
    assert alpaca.source_format == "alpaca"
    assert alpaca.dataset[1]["messages"][0]["content"] == "Translate to Wendish.\n\nhello"
    sharegpt = prepare(SHAREGPT, dataset_format="auto", chat_template=CHAT_TEMPLATE, param="d")
    assert sharegpt.dataset[0]["messages"][1] == {"role": "assistant", "content": "Hello."}


def test_bad_datasets_get_errors_naming_columns_and_formats(tmp_path):
    """Empty data, missing files, unknown columns and unusable rows are refused before training starts."""
    with pytest.raises(DatasetError, match="empty list"):
        prepare([], dataset_format="auto", chat_template=None, param="train_dataset")
    with pytest.raises(DatasetError, match="no such file"):
        prepare(str(tmp_path / "missing.jsonl"), dataset_format="auto", chat_template=None, param="train_dataset")
    with pytest.raises(DatasetError, match=r"columns \['question', 'answer'\].*'prompt' \+ 'completion'"):
        prepare([{"question": "q", "answer": "a"}], dataset_format="auto", chat_template=None, param="train_dataset")
    with pytest.raises(DatasetError, match="none of its 2 rows"):
        prepare([{"text": ""}, {"text": "   "}], dataset_format="auto", chat_template=None, param="train_dataset")
    with pytest.raises(DatasetError, match="dataset_format='alpaca'"):
        prepare([{"text": "hi"}], dataset_format="alpaca", chat_template=None, param="train_dataset")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DatasetError, match="unsupported file type"):
        prepare(str(tmp_path / "d.xlsx"), dataset_format="auto", chat_template=None, param="train_dataset")


def test_partly_empty_rows_are_skipped_with_a_warning():
    """Rows with empty fields are dropped, counted, and reported; the rest train."""
    got = prepare([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}],
                  dataset_format="auto", chat_template=None, param="train_dataset")
    assert len(got.dataset) == 1 and "skipped 1 of 2" in got.warnings[0]


@pytest.fixture(scope="module")
def loaded(mcp, tiny_model):
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "ds", **FAST_LOAD})
    mcp.ok("qloraevolved_prepare_for_training", {"model_id": "ds", **FAST_TRAIN, "max_steps": 3})
    return "ds"


@pytest.mark.parametrize("form", ["jsonl", "messages", "alpaca", "text", "saved_folder"])
def test_each_form_trains_through_the_tool(mcp, loaded, workspace, demo_rows, form):
    """Every dataset form and row format trains through qloraevolved_train (relative paths from the workspace)."""
    import datasets

    if form == "jsonl":
        write_jsonl(workspace / "train.jsonl", demo_rows)
        source = "train.jsonl"
    elif form == "messages":
        source = demo_messages_records()
    elif form == "alpaca":
        source = ALPACA * 4
    elif form == "text":
        source = [{"text": f"{r['prompt']}{r['completion']}"} for r in demo_rows]
    else:
        datasets.Dataset.from_list(demo_rows).save_to_disk(str(workspace / "saved"))
        source = "saved"
    answer = mcp.ok("qloraevolved_train", {"wait_seconds": -1, "model_id": loaded, "train_dataset": source,
                                           "output_dir": f"out-{form}"})
    assert answer["status"] == "success" and answer["global_step"] == 3
    assert (workspace / f"out-{form}" / "final" / "adapter_model.safetensors").is_file()


def test_bad_dataset_is_a_tool_error_and_the_model_stays(mcp, loaded):
    """A dataset error comes back as a tool error naming the problem; the model stays loaded and usable."""
    text = mcp.error("qloraevolved_train", {"model_id": loaded, "train_dataset": [{"question": "q"}],
                                            "output_dir": "out-bad"})
    assert "train_dataset" in text and "question" in text
    text = mcp.error("qloraevolved_train", {"model_id": loaded, "train_dataset": "nope/missing.jsonl",
                                            "output_dir": "out-bad"})
    assert "no such file" in text
    text = mcp.error("qloraevolved_train", {"model_id": loaded, "train_dataset": [{"text": "hi"}],
                                            "eval_dataset": [], "output_dir": "out-bad"})
    assert "eval_dataset" in text
    assert mcp.ok("qloraevolved_list_models")["models"][loaded]["state"] == "prepared"
