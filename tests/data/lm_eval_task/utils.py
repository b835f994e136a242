"""The dataset of the qwen_ref_local task: items.jsonl beside this file, as the test split."""

from pathlib import Path

import datasets


def load_items(**metadata):
    """lm-eval passes the task's metadata and model_args; the items do not depend on them."""
    return datasets.DatasetDict({"test": datasets.load_dataset(
        "json", data_files=str(Path(__file__).with_name("items.jsonl")), split="train")})
