"""Step 4: datasets (clean / corrupted prompts with answers) and the task generators."""

from circuitgraph.data.dataset import DataError, Example, TaskData, load_dataset, read_jsonl, tokenize

__all__ = ["DataError", "Example", "TaskData", "load_dataset", "read_jsonl", "tokenize"]
