"""Where computation runs: one parser for every command's ``--device cpu|cuda|auto``.

Every command resolves its device here, so ``auto`` means the same everywhere (the first CUDA device when
one is available, else the CPU) and a request for a device this machine lacks is one clear error before
any work. The code that runs on the device is the same code that runs on the CPU: models and blocks are
moved with ``.to(device)`` and the decomposition methods compute wherever the weight lives (float32, and
float64 for Gram/Cholesky work), storing factors in the model's dtype.
"""

from __future__ import annotations

import re

from rankwise.errors import RankwiseError

DEVICE_HELP = "cpu, cuda (cuda:N) or auto (cuda when available, else cpu)."
_CUDA = re.compile(r"^cuda(:\d+)?$")


def resolve_device(name: str | None, where: str = "--device") -> str:
    """``cpu`` / ``cuda`` / ``cuda:N`` / ``mps`` / ``auto`` -> a torch device string available here."""
    import torch

    text = (name or "cpu").strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if _CUDA.match(text):
        if not torch.cuda.is_available():
            raise RankwiseError(f"{where} {text}: no CUDA device is available on this machine (use cpu or auto)")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise RankwiseError(f"{where} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return text
    if text == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise RankwiseError(f"{where} mps: no MPS device is available on this machine")
        return text
    raise RankwiseError(f"{where}: '{name}' is not a device (choose cpu, cuda, cuda:N or auto)")
