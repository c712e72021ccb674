"""Calibration text: N token windows of L tokens, drawn (seeded) from a named source or a user file.

The data-aware methods (ASVD, SVD-LLM, FWSVD) need a few hundred sequences of ordinary text. The field
samples random 2048-token windows from the WikiText-2 *train* split, which is not available offline here,
so rankwise's default source ``wikitext2`` is the WikiText-2 **validation** split
(``wikitext-2-tokens/wiki.valid.tokens``): real Wikipedia text of the same distribution, disjoint from the
test split that WikiText-2 perplexity is reported on, so calibrating on it does not leak the evaluation
set. Its caveat: it is the tokenized release (``<unk>`` for rare words, spaces around punctuation such as
``" , "`` and ``" @-@ "``), slightly different from raw text. ``wikitext2-test`` (the raw test split) is
offered for parity with papers that calibrate on it, with the leakage that implies for test perplexity.
Any ``.txt`` file (or ``.jsonl`` with a ``text`` field) works too: pass its path as the dataset.

Windows are random slices of the whole source's token stream (one tokenization, no padding, every window
exactly L tokens), chosen by a seeded ``torch.Generator`` so a run is reproducible and cacheable. The text
is tokenized a piece at a time (:func:`encode_text`) with the ids of one call on the whole text: one call
on WikiText-2's 1.1 MB validation split makes a fast tokenizer peak at about 150 MiB, ten blocks of
SmolLM2, which mattered for streaming decomposition's memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rankwise.errors import DataError
from rankwise.settings import data_dir as resolve_data_dir

#: Named sources: name -> (file under the data folder, format, one-line description).
SOURCES: dict[str, tuple[str, str, str]] = {
    "wikitext2": ("wikitext-2-tokens/wiki.valid.tokens", "text",
                  "WikiText-2 validation split (tokenized release); disjoint from the test split"),
    "wikitext2-test": ("wikitext-2-raw/wiki.test.raw", "text",
                       "WikiText-2 raw test split (leaks into WikiText-2 test perplexity)"),
}
DEFAULT_SOURCE = "wikitext2"


@dataclass(frozen=True)
class CalibrationConfig:
    """Which calibration data to use: source, number of windows, window length, seed.

    ``batch_size`` only sets how many windows go through the model at once (memory vs speed); it does
    not change which tokens are seen, so it is not part of the cache key.
    """

    dataset: str = DEFAULT_SOURCE
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 4
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"calibration {name.replace('_', '-')}: {value!r} must be an integer >= 1")

    def describe(self) -> dict[str, Any]:
        """The settings that decide the tokens (for reports and the cache's metadata)."""
        out = asdict(self)
        out.pop("batch_size")
        out.pop("data_dir")
        return out


def source_path(dataset: str, data_dir: str | None = None) -> tuple[Path, str]:
    """The file behind a named source or a user path, and its format (``text`` or ``jsonl``)."""
    if dataset in SOURCES:
        rel, fmt, _ = SOURCES[dataset]
        root = resolve_data_dir(data_dir)
        if root is None:
            raise DataError(f"calibration data '{dataset}' needs the data folder: set RANKWISE_DATA or --data-dir")
        path = root / rel
        if not path.is_file():
            raise DataError(f"calibration data '{dataset}': {path} not found")
        return path, fmt
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise DataError(
            f"calibration data '{dataset}': neither a named source ({', '.join(SOURCES)}) nor an existing file")
    if path.suffix not in (".txt", ".raw", ".tokens", ".jsonl"):
        raise DataError(f"calibration file {path}: expected a .txt file or a .jsonl file with a 'text' field")
    return path, "jsonl" if path.suffix == ".jsonl" else "text"


def read_text(path: Path, fmt: str) -> str:
    """The whole source as one string (JSONL rows joined by blank lines, as WikiText rows are)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"calibration file {path}: unreadable ({exc})") from None
    if fmt == "text":
        return raw
    rows = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"calibration file {path}: line {i} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"calibration file {path}: line {i} has no string field 'text'")
        rows.append(row["text"])
    return "\n\n".join(rows)


def sample_windows(token_ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens (an n × L int64 tensor), seeded.

    Windows may overlap when the source is short; a source shorter than one window is an error.
    """
    total = int(token_ids.numel())
    if total < seq_len:
        raise DataError(f"calibration text has {total} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seq_len + 1, (n_samples,), generator=gen)
    offsets = torch.arange(seq_len)
    return token_ids[starts[:, None] + offsets[None, :]].to(torch.int64)


#: Characters per tokenizer call (see :func:`encode_text`).
PIECE_CHARS = 1 << 16
#: Characters each side of a cut that :func:`_cut_is_clean` re-tokenizes to check it.
CHECK_CHARS = 256
#: Candidate cuts tried per piece before the rest of the text is encoded in one call.
MAX_TRIED_CUTS = 32
#: Where a piece may end: before a single space between two visible characters (a word boundary).
_CUTS = re.compile(r"(?<=\S) (?=\S)")


def encode_text(tokenizer: Any, text: str, piece_chars: int = PIECE_CHARS) -> torch.Tensor:
    """The ids of ``text`` without special tokens (int64): those of one tokenizer call on all of it, in
    calls of about ``piece_chars`` characters.

    Why pieces: a fast tokenizer's working memory grows with the text of one call (offsets, alignments and
    strings of every token at once: about 150 MiB for WikiText-2's 1.1 MB validation split). Why the ids
    stay those of one call: a piece ends before the space of a word boundary, and only where re-tokenizing
    ``CHECK_CHARS`` characters each side gives the same ids apart as joined. That check is local, a
    heuristic: it holds wherever no token depends on text farther than that from the cut, which is the case
    for the GPT-2, Llama-3, BERT and SentencePiece pre-tokenizers (tested equal on both bundled tokenizers
    and both WikiText-2 splits). A tokenizer that marks the start of every call (a ``Prepend`` normalizer)
    fails the check everywhere: after ``MAX_TRIED_CUTS`` failed candidates the rest is encoded in one call."""
    parts: list[torch.Tensor] = []
    start = 0
    while start < len(text):
        end = _next_cut(tokenizer, text, start, piece_chars) if len(text) - start > piece_chars else len(text)
        parts.append(torch.tensor(_ids(tokenizer, text[start:end]), dtype=torch.int64))
        start = end
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _next_cut(tokenizer: Any, text: str, start: int, piece_chars: int) -> int:
    """The first clean cut at least ``piece_chars`` after ``start``, or the end of the text."""
    for tried, match in enumerate(_CUTS.finditer(text, start + piece_chars)):
        if tried == MAX_TRIED_CUTS:
            break
        if _cut_is_clean(tokenizer, text, match.start()):
            return match.start()
    return len(text)


def _cut_is_clean(tokenizer: Any, text: str, cut: int) -> bool:
    """Whether the text around ``cut`` tokenizes to the same ids in two calls as in one."""
    left, right = text[max(0, cut - CHECK_CHARS):cut], text[cut:cut + CHECK_CHARS]
    return _ids(tokenizer, left) + _ids(tokenizer, right) == _ids(tokenizer, left + right)


def calibration_ids(tokenizer: Any, config: CalibrationConfig, max_length: int | None = None) -> torch.Tensor:
    """Token windows for ``config`` (n_samples × seq_len), tokenized with the model's own tokenizer."""
    if tokenizer is None:
        raise DataError("calibration needs the model's tokenizer (pass tokenizer=...)")
    if max_length is not None and config.seq_len > max_length:
        raise DataError(f"calibration seq-len {config.seq_len} exceeds the model's maximum length {max_length}")
    path, fmt = source_path(config.dataset, config.data_dir)
    text = read_text(path, fmt)
    return sample_windows(encode_text(tokenizer, text), config.n_samples, config.seq_len, config.seed)
