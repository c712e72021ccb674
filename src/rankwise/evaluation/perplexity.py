"""Perplexity machinery: token windows, lm-eval's rolling windows, and batched target log-probabilities.

Two protocols measure "perplexity" on WikiText-2 and they give very different numbers (Llama-2-7B: 5.47
token-level vs 8.79 word perplexity, lm-eval issue #2301), so both live here, each with its own window
builder, and share one scorer:

* **token-level** (GPTQ / SVD-LLM / ASVD): the test rows joined by ``"\\n\\n"`` are tokenized once and cut
  into non-overlapping windows of ``seq_len`` tokens; the last partial window is dropped; each window is
  scored independently (no context from the previous one); perplexity = exp(mean NLL over every predicted
  token, i.e. ``seq_len - 1`` per window).
* **rolling** (lm-eval's ``loglikelihood_rolling``): each document is tokenized alone and every token is
  predicted exactly once; the first window conditions on a prefix token (BOS, else EOS), later windows
  slide so that each predicted chunk sees up to ``max_len`` tokens of the same document as context. The
  window arithmetic mirrors ``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window``.

A window is a model input plus the tokens its last positions must predict. The scorer asks the model for
logits only at those positions (``logits_to_keep`` mask) and turns them into the targets' log-probabilities
a chunk of positions at a time, so no full-vocabulary ``log_softmax`` is materialised next to the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.evaluation.engine import max_model_length, prefix_token_id
from rankwise.models.forward import forward_caps

Progress = Callable[[int], None]

__all__ = [
    "TokenPerplexity",
    "Window",
    "encode",
    "max_model_length",
    "prefix_token_id",
    "rolling_pairs",
    "rolling_windows",
    "score_windows",
    "target_logprobs",
    "token_perplexity",
    "token_windows",
]


@dataclass(frozen=True)
class Window:
    """One forward pass: ``inputs`` is fed to the model; its last ``len(targets)`` positions predict ``targets``.

    ``targets[j]`` is the token that follows position ``len(inputs) - len(targets) + j``; for a window
    cut from one token stream that is ``inputs[k + 1]`` (or the token after the window for the last one).
    """

    inputs: tuple[int, ...]
    targets: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.targets or len(self.targets) > len(self.inputs):
            raise ValueError(f"window with {len(self.inputs)} inputs cannot predict {len(self.targets)} targets")

    @classmethod
    def from_pair(cls, context: Sequence[int], continuation: Sequence[int]) -> Window:
        """lm-eval's request form: score ``continuation`` after ``context`` (the model sees all but the last token)."""
        whole = list(context) + list(continuation)
        return cls(tuple(whole[:-1]), tuple(continuation))


def token_windows(ids: Sequence[int], seq_len: int) -> list[Window]:
    """Non-overlapping windows of ``seq_len`` tokens (GPTQ's protocol); a last partial window is dropped.

    Each window predicts its own tokens 2..seq_len from the ones before them, so ``seq_len - 1`` tokens
    are scored per window and the first token of each window is only ever context.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    out = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        chunk = tuple(ids[start : start + seq_len])
        out.append(Window(chunk[:-1], chunk[1:]))
    return out


def rolling_pairs(ids: Sequence[int], prefix_token: int, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (context_len=1) as (context, continuation) pairs.

    Every token of ``ids`` is a continuation token exactly once. The first window predicts the first
    ``max_len`` tokens after ``prefix_token``; each later window predicts the next (up to) ``max_len``
    tokens, with context filling the window back to ``max_len`` inputs.
    """
    if max_len < 1:
        raise ValueError("max_len must be at least 1")
    if not ids:
        return
    ids = list(ids)
    first = min(max_len, len(ids))
    yield [prefix_token], ids[:first]
    predicted = first
    while predicted < len(ids):
        n_pred = min(len(ids) - predicted, max_len)
        end = predicted + n_pred
        window = ids[end - max_len - 1 : end - 1]
        yield window[: len(window) - (n_pred - 1)], ids[end - n_pred : end]
        predicted += n_pred


def rolling_windows(ids: Sequence[int], prefix_token: int, max_len: int) -> list[Window]:
    return [Window.from_pair(c, t) for c, t in rolling_pairs(ids, prefix_token, max_len)]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Tokenize as lm-eval and GPTQ do: the tokenizer's own special-token default, no truncation.

    ``verbose=False`` silences the "longer than the model's maximum length" warning: windows handle length.
    """
    return list(tokenizer(text, verbose=False)["input_ids"])


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _takes_logits_to_keep(model: Any) -> bool:
    return forward_caps(model).logits_to_keep


def _batches(order: list[int], windows: Sequence[Window], batch_size: int, token_budget: int) -> Iterator[list[int]]:
    """Consecutive groups of window indices (longest first) under a count and a padded-token budget."""
    batch: list[int] = []
    for idx in order:
        longest = len(windows[batch[0]].inputs) if batch else len(windows[idx].inputs)
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * longest > token_budget):
            yield batch
            batch = []
        batch.append(idx)
    if batch:
        yield batch


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(target) for each row of ``logits`` (positions x vocab), ``chunk`` rows at a time in float32.

    Equivalent to ``log_softmax(logits).gather(targets)`` without a second vocabulary-sized tensor.
    """
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, targets.shape[0], chunk):
        rows = logits[start : start + chunk].float()
        tgt = targets[start : start + chunk]
        out[start : start + chunk] = rows.gather(-1, tgt[:, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1)
    return out


def _target_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, padded: bool,
                   use_keep: bool) -> torch.Tensor:
    """Logits at the ``keep`` positions, flattened to (n_kept, vocab); the LM head runs only there if it can."""
    kwargs: dict[str, Any] = {"input_ids": ids}
    if padded:
        kwargs["attention_mask"] = mask
    if use_keep:
        logits = model(logits_to_keep=keep, **kwargs).logits
        if logits.ndim == 2 and logits.shape[0] == int(keep.sum()):
            return logits
        if logits.ndim == 3 and logits.shape[:2] == keep.shape:
            return logits[keep]
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)} for a logits_to_keep mask")
    return model(**kwargs).logits[keep]


def score_windows(
    model: Any,
    windows: Sequence[Window],
    batch_size: int = 16,
    token_budget: int = 4096,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Per-target log-probabilities (float32, on CPU) of every window, in the order given.

    Windows are sorted longest first and right-padded into batches of at most ``batch_size`` windows and
    ``token_budget`` padded tokens. The LM head runs only at target positions (``logits_to_keep`` mask)
    when the model's forward takes it, so a batch holds ``targets x vocab`` logits, not more.
    ``progress`` is called with the number of windows finished after each batch.
    """
    device = _device(model)
    use_keep = _takes_logits_to_keep(model)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
    results: list[torch.Tensor | None] = [None] * len(windows)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            for batch in _batches(order, windows, max(1, batch_size), max(1, token_budget)):
                width = len(windows[batch[0]].inputs)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                keep = torch.zeros((len(batch), width), dtype=torch.bool)
                targets: list[int] = []
                for row, idx in enumerate(batch):
                    win = windows[idx]
                    n, k = len(win.inputs), len(win.targets)
                    ids[row, :n] = torch.tensor(win.inputs, dtype=torch.long)
                    mask[row, :n] = 1
                    keep[row, n - k : n] = True
                    targets.extend(win.targets)
                padded = bool((mask == 0).any())
                logits = _target_logits(model, ids.to(device), mask.to(device), keep.to(device), padded, use_keep)
                flat = target_logprobs(logits, torch.tensor(targets, dtype=torch.long, device=logits.device)).cpu()
                del logits
                start = 0
                for idx in batch:  # row-major order of the mask = batch order, targets in sequence order
                    k = len(windows[idx].targets)
                    results[idx] = flat[start : start + k]
                    start += k
                if progress is not None:
                    progress(len(batch))
    finally:
        if was_training:
            model.train()
    return [r for r in results if r is not None]


@dataclass(frozen=True)
class TokenPerplexity:
    """exp(mean NLL) over ``n_tokens`` predicted tokens, with a window-level standard error."""

    ppl: float
    mean_nll: float
    n_tokens: int
    n_windows: int
    ppl_stderr: float | None


def token_perplexity(window_logprobs: Sequence[torch.Tensor]) -> TokenPerplexity:
    """Perplexity over all predicted tokens; the stderr treats windows as independent samples.

    The standard error of the mean NLL is the std of per-window mean NLLs / sqrt(windows) (every window
    predicts the same number of tokens in the token protocol), mapped to perplexity by the delta method.
    """
    nll = torch.cat([-lp.double() for lp in window_logprobs]) if window_logprobs else torch.empty(0)
    if nll.numel() == 0:
        raise ValueError("no tokens to score")
    mean = float(nll.mean())
    per_window = torch.stack([-lp.double().mean() for lp in window_logprobs])
    stderr = None
    if per_window.numel() > 1:
        stderr = math.exp(mean) * float(per_window.std(unbiased=True)) / math.sqrt(per_window.numel())
    return TokenPerplexity(math.exp(mean), mean, int(nll.numel()), len(window_logprobs), stderr)
