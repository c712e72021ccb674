"""Task modules; importing this package registers every task (add new modules to the list below)."""

import importlib

TASK_MODULES: tuple[str, ...] = ("arc", "hellaswag", "piqa", "boolq", "openbookqa", "truthfulqa", "mmlu", "lambada", "superglue",
                                  "wikitext", "gsm8k", "stsb", "winogrande")

for _m in TASK_MODULES:
    importlib.import_module(f"rankwise.evaluation.tasks.{_m}")
