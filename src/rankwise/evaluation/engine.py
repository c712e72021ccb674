"""Log-likelihood scoring of continuations, numerically the same as lm-eval's HFLM but faster.

What is computed is exactly lm-eval 0.4.13's ``HFLM.loglikelihood``: the context's trailing whitespace
moves to the continuation, ``context + continuation`` is encoded whole and the continuation tokens are the
ones after the context's own encoding (:func:`encode_pair`); sequences longer than the model's maximum
length lose tokens on the left; the score is the sum of the continuation tokens' log-probabilities and
``is_greedy`` says whether every continuation token is the argmax.

How it is computed differs, because a multiple-choice question asks for the same context several times:

* requests are grouped by their (token) context, and each question becomes one packed sequence,
  ``[context | choice 1 | choice 2 | ...]`` (each choice without its last token), with position ids that
  restart after the context for every choice and a 4-D attention mask that lets each choice see only the
  context and its own earlier tokens ("packed" strategy). One forward pass scores every choice exactly as
  if it followed the context alone; the context runs once instead of once per choice.
* contexts that share a long head (MMLU's few-shot block, TruthfulQA's primer) are batched together and
  the head runs once per batch, its key/value cache reused by every row.
* batches are sorted by length and split so padding stays small (on a CPU a pad token costs as much as
  a real one), and everything runs under ``torch.inference_mode``.
* the LM head and the log-softmax are evaluated only at the positions that predict continuation tokens
  (``logits_to_keep`` with a boolean mask), never over the whole sequence and full vocabulary.
* every distinct context string is tokenized once.

Which strategy a model gets is decided once per model (:func:`resolve_strategy`), and said: every result's
protocol carries ``strategy`` and ``strategy_reason``.

* "packed" needs a forward that takes position ids and a custom 4-D mask, and attention whose rule the
  mask can state: the mask applies each layer type's sliding window on *position* distance (a choice sees
  the context tokens within the window, as it would alone), one mask per layer type where layers
  alternate (Gemma-2/3 ``layer_types``, passed as a dict keyed by layer type); positions restart after the
  context for every choice, which also makes absolute position embeddings (GPT-2, OPT) exact. Soft-capping
  of attention or final logits and attention sinks act per score row and are untouched by the mask. ALiBi
  (biases from the token's index, not its position id) and chunked attention cannot be packed exactly and
  are refused with that reason. A probe (two questions sharing a few-shot-like head, choices reaching past
  a short window) then checks packed scores against one sequence per request.
* "shared-context" (context once, its key/value cache copied per choice; contexts left-padded with
  explicit position ids) for a model with a KV cache that cannot be packed; a head shared by a batch is
  cached once only while the batch's whole span fits inside the smallest sliding window (padding between
  a cached head and a row would otherwise count towards the window).
* "full" (one sequence per request, like lm-eval) for a model whose forward takes no KV cache.

The probe catches only the errors that mean "this forward cannot take a 4-D mask or position ids"
(:func:`_is_incompatibility`); any other error surfaces. ``strategy=`` forces one and is refused with a
one-line :class:`~rankwise.errors.RankwiseError` where it would be inexact. A forward without
``logits_to_keep`` is handled by slicing the full logits. All strategies agree with lm-eval to float
rounding (tests check 1e-4 between them on eight architectures).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from rankwise.errors import RankwiseError, first_line
from rankwise.models.forward import forward_caps, output_cache

#: lm-eval's fallback when neither the config nor the tokenizer states a maximum length.
DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656
#: Cap on positions whose full-vocabulary logits exist at once in a continuation pass (memory bound).
_MAX_LOGIT_POSITIONS = 2048
#: Largest share of padding tokens (relative to real ones) a batch may carry before it is split.
_MAX_PADDING = 0.25
#: ... plus this many padding tokens per row (a few pad tokens cost less than another forward pass).
_PAD_SLACK = 4
#: Shortest common head (tokens) of a batch's contexts worth computing once for the whole batch.
_MIN_SHARED_HEAD = 32
#: Scoring strategies: "packed" (context + all choices in one sequence, a custom attention mask),
#: "shared-context" (context once, key/value cache copied per choice), "full" (one sequence per request,
#: like lm-eval); "auto" picks the first the model supports.
STRATEGIES = ("auto", "packed", "shared-context", "full")

Progress = Callable[[int], None]


class LoglikelihoodResult(NamedTuple):
    """One request's score: summed continuation log-probability, greedy match, continuation token count."""

    logprob: float
    is_greedy: bool
    n_tokens: int


# --------------------------------------------------------------------------------------------- tokenization


class PairEncoder:
    """lm-eval's ``tok_encode`` / ``_encode_pair`` for a causal LM, memoising each distinct string's encoding.

    ``add_bos_token`` mirrors HFLM's argument of the same name (None: the tokenizer's default special
    tokens). A string that already starts with the prefix (BOS) token's text is encoded without special
    tokens, as HFLM does.
    """

    def __init__(self, tokenizer: Any, add_bos_token: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self._cache: dict[tuple[str, bool | None], list[int]] = {}
        prefix = prefix_token_id(tokenizer)
        self._bos_text = tokenizer.decode(prefix) if prefix is not None else None

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        key = (text, add_special_tokens)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        kwargs: dict[str, bool] = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and self._bos_text and text.startswith(self._bos_text):
            kwargs["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(text, **kwargs))
        self._cache[key] = ids
        return ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) exactly as lm-eval's ``loglikelihood`` builds them."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            prefix = prefix_token_id(self.tokenizer)
            if cont and prefix == cont[0]:
                return cont[:1], cont[1:]
            return [prefix], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """One (context, continuation) pair's token ids, as lm-eval's ``HFLM`` splits them (see :class:`PairEncoder`)."""
    return PairEncoder(tokenizer).pair(context, continuation)


def prefix_token_id(tokenizer: Any) -> int:
    """The token that stands in for an empty context: BOS, else EOS (HFLM's ``prefix_token_id``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else tokenizer.eos_token_id


def max_model_length(model: Any, tokenizer: Any = None) -> int:
    """The context length lm-eval assumes for a model (config, then tokenizer, then 2048)."""
    config = getattr(model, "config", None)
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max != _TOKENIZER_INFINITY:
        return int(model_max)
    return DEFAULT_MAX_LENGTH


# --------------------------------------------------------------------------------------------- public API


def loglikelihood(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    strategy: str = "auto",
    progress: Progress | None = None,
    encoder: PairEncoder | None = None,
) -> list[LoglikelihoodResult]:
    """Score ``(context, continuation)`` string pairs; results come back in request order.

    ``batch_size`` is the number of distinct contexts (questions) per forward pass. ``strategy`` is one of
    :data:`STRATEGIES`: ``"auto"`` (default: the fastest the model supports, see :func:`choose_strategy`),
    ``"packed"``, ``"shared-context"`` or ``"full"`` (one sequence per request, like lm-eval); all give the
    same numbers. ``progress`` is called with the number of requests finished after each pass.
    """
    encoder = encoder or PairEncoder(tokenizer)
    pairs = [encoder.pair(ctx, cont) for ctx, cont in requests]
    return loglikelihood_tokens(
        model, pairs, batch_size=batch_size, max_length=max_length or max_model_length(model, tokenizer),
        strategy=strategy, progress=progress, pad_token_id=_pad_id(tokenizer),
    )


def loglikelihood_tokens(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    strategy: str = "auto",
    progress: Progress | None = None,
    pad_token_id: int = 0,
) -> list[LoglikelihoodResult]:
    """Score already-tokenized ``(context_ids, continuation_ids)`` pairs (see :func:`loglikelihood`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    results: list[LoglikelihoodResult | None] = [None] * len(pairs)
    items: list[_Item] = []
    for i, (ctx, cont) in enumerate(pairs):
        if len(cont) == 0:  # log P(empty string) = 0; lm-eval would assert here
            results[i] = LoglikelihoodResult(0.0, True, 0)
            continue
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's {max_length}")
        items.append(_Item(i, *_truncate(list(ctx), list(cont), max_length)))

    strategy = resolve_strategy(model, strategy, pad_token_id).name
    caps = _capabilities(model)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            if strategy == "packed":
                batches = _batches(_group(items, share=True), batch_size, key=lambda g: g.row)
                score: Callable[..., list[tuple[_Item, LoglikelihoodResult]]] = _score_packed
            else:
                share = strategy == "shared-context" and caps.cache
                batches = _batches(_group(items, share), batch_size)
                score = _score_batch
            for batch in batches:
                for item, res in score(model, batch, caps, pad_token_id):
                    results[item.index] = res
                if progress is not None:
                    progress(sum(len(g.items) for g in batch))
    finally:
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Item:
    index: int
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class _Group:
    """Requests sharing one context. A lone request runs as one sequence (prefix = ctx + cont[:-1])."""

    context: tuple[int, ...]
    items: list[_Item]

    @property
    def shared(self) -> bool:
        return len(self.items) > 1

    @property
    def prefix(self) -> tuple[int, ...]:
        if self.shared:
            return self.context
        return self.context + self.items[0].continuation[:-1]

    @property
    def keep(self) -> int:
        """How many of the prefix's last positions predict continuation tokens."""
        return 1 if self.shared else len(self.items[0].continuation)

    @property
    def row(self) -> tuple[int, ...]:
        """The packed sequence: the context, then every continuation but its last token, one after another."""
        return self.context + tuple(t for it in self.items for t in it.continuation[:-1])


@dataclass(frozen=True)
class _Attention:
    """What a packed mask must reproduce of the model's own attention rule.

    ``windows`` maps each layer type the model uses to its sliding window (None: full causal attention);
    with more than one type the mask goes in as a dict keyed by layer type (``per_type``), as transformers'
    hybrid models (Gemma-2/3, Qwen2 with ``max_window_layers``, gpt-oss) accept. ``problem`` says why the
    attention cannot be packed exactly (None: it can).
    """

    windows: dict[str, int | None]
    problem: str | None = None

    @property
    def per_type(self) -> bool:
        return len(self.windows) > 1

    @property
    def smallest_window(self) -> int | None:
        sizes = [w for w in self.windows.values() if w is not None]
        return min(sizes) if sizes else None

    def describe(self) -> str:
        if self.smallest_window is None:
            return "causal attention"
        return ", ".join(f"{name.replace('_attention', '')}" + (f" window {w}" if w else "")
                         for name, w in self.windows.items())


@dataclass(frozen=True)
class _Caps:
    cache_arg: str | None  # the forward's KV-cache argument ("cache" or "past_key_values"), None: no cache
    keep_mask: bool  # forward takes logits_to_keep (a boolean mask is tried, then checked)
    position_ids: bool = True  # forward takes position_ids
    attention: _Attention = _Attention({"full_attention": None})

    @property
    def cache(self) -> bool:
        return self.cache_arg is not None

    @property
    def window(self) -> int | None:
        return self.attention.smallest_window


def _truncate(ctx: list[int], cont: list[int], max_length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """lm-eval's left truncation: keep the last ``max_length + 1`` tokens of context + continuation."""
    whole = (ctx + cont)[-(max_length + 1):]
    return tuple(whole[: len(whole) - len(cont)]), tuple(cont)


def _capabilities(model: Any) -> _Caps:
    caps = forward_caps(model)
    return _Caps(cache_arg=caps.cache_arg if caps.kv_cache else None, keep_mask=caps.logits_to_keep,
                 position_ids=caps.position_ids, attention=_attention(model))


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:
            return getter()
    return getattr(config, "text_config", None) or config


def _flag(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _attention(model: Any) -> _Attention:
    """The model's attention rule, read from its config (transformers' names: ``layer_types``,
    ``sliding_window``, ``use_sliding_window``, ``attention_chunk_size``, ``alibi``)."""
    cfg = _text_config(model)
    if cfg is None:
        return _Attention({"full_attention": None})
    if _flag(cfg, "alibi") or _flag(_flag(cfg, "attn_config") or {}, "alibi"):
        return _Attention({"full_attention": None}, problem=(
            "ALiBi attention biases follow each token's index in the sequence, not its position id, so a "
            "packed choice would see the context at the wrong distance"))
    if _flag(cfg, "attention_chunk_size"):
        return _Attention({"full_attention": None}, problem=(
            "chunked attention restarts at chunk boundaries of the row; a packed mask does not state it here"))
    window = _flag(cfg, "sliding_window")
    if _flag(cfg, "use_sliding_window") is False:
        window = None
    window = int(window) if isinstance(window, int | float) and window > 0 else None
    layer_types = _flag(cfg, "layer_types")
    if not layer_types:
        return _Attention({"sliding_attention" if window else "full_attention": window})
    windows: dict[str, int | None] = {}
    for kind in dict.fromkeys(layer_types):
        if kind == "full_attention":
            windows[kind] = None
        elif kind == "sliding_attention" and window:
            windows[kind] = window
        else:
            return _Attention({"full_attention": None}, problem=(
                f"layer type {kind!r} has no mask rule rankwise can state in a packed mask"))
    return _Attention(windows)


def _group(items: list[_Item], share: bool) -> list[_Group]:
    if not share:
        return [_Group(it.context, [it]) for it in items]
    by_ctx: dict[tuple[int, ...], _Group] = {}
    for it in items:
        group = by_ctx.get(it.context)
        if group is None:
            by_ctx[it.context] = _Group(it.context, [it])
        else:
            group.items.append(it)
    return list(by_ctx.values())


def _batches(groups: list[_Group], batch_size: int,
             key: Callable[[_Group], tuple[int, ...]] = lambda g: g.prefix) -> list[list[_Group]]:
    """Batches of at most ``batch_size`` groups whose padding stays under ``_MAX_PADDING``.

    ``key`` gives the token sequence a group runs as. Groups whose sequences share a long head (few-shot
    examples, a fixed primer: at least ``_MIN_SHARED_HEAD`` tokens) are batched together so the head runs
    once per batch; the others are batched by length. Longest first within each (memory errors and slow
    batches show at once).
    """
    families, pool = _families(groups, key)
    batches: list[list[_Group]] = []
    for family in families:
        base = _common_length([key(g) for g in family])
        family.sort(key=lambda g: (-len(key(g)), key(g)))
        batches += _chunk(family, [len(key(g)) - base for g in family], batch_size)
    pool.sort(key=lambda g: (-len(key(g)), key(g)))
    batches += _chunk(pool, [len(key(g)) for g in pool], batch_size)
    return batches


def _families(groups: list[_Group],
              key: Callable[[_Group], tuple[int, ...]]) -> tuple[list[list[_Group]], list[_Group]]:
    """Runs of lexicographically adjacent prefixes sharing >= ``_MIN_SHARED_HEAD`` tokens (the whole run
    then shares at least that many: for sorted sequences the common prefix of a run is the minimum of
    the neighbours'), and the groups in no such run."""
    ordered = sorted(groups, key=key)
    families: list[list[_Group]] = []
    pool: list[_Group] = []
    run: list[_Group] = []
    for g in [*ordered, None]:
        if run and (g is None or _common_length([key(run[-1]), key(g)]) < _MIN_SHARED_HEAD):
            if len(run) > 1:
                families.append(run)
            else:
                pool.extend(run)
            run = []
        if g is not None:
            run.append(g)
    return families, pool


def _common_length(seqs: list[tuple[int, ...]]) -> int:
    """Length of the longest common prefix of token sequences."""
    first = min(seqs, key=len)
    for i, tok in enumerate(first):
        if any(s[i] != tok for s in seqs):
            return i
    return len(first)


def _shared_head(batch: list[_Group]) -> int:
    """How many leading tokens the whole batch shares and can run once (0 when too few to be worth it);
    every row keeps at least the positions it must score."""
    head = min(_common_length([g.prefix for g in batch]), *(len(g.prefix) - g.keep for g in batch))
    return head if head >= _MIN_SHARED_HEAD else 0


def _prefill(model: Any, caps: _Caps, head: tuple[int, ...], rows: int) -> Any:
    """The key/value cache of ``head`` (run once, batch 1), repeated for ``rows`` rows."""
    ids = torch.tensor([head], dtype=torch.long, device=_device(model))
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
    if caps.keep_mask:
        kwargs["logits_to_keep"] = 1
    cache = output_cache(model(**kwargs))
    if isinstance(cache, tuple):
        return tuple(tuple(t.expand(rows, *t.shape[1:]).contiguous() for t in layer) for layer in cache)
    cache.batch_repeat_interleave(rows)
    return cache


def _chunk(items: list[Any], lengths: list[int], max_rows: int) -> list[list[Any]]:
    """Split items sorted by decreasing length into batches of at most ``max_rows`` rows whose padding is at
    most ``_MAX_PADDING`` of their real tokens plus ``_PAD_SLACK`` per row (on a CPU, padded tokens cost as
    much as real ones)."""
    batches: list[list[Any]] = []
    current: list[Any] = []
    real = width = 0
    for item, n in zip(items, lengths, strict=True):
        rows = len(current) + 1
        if current and (rows > max_rows or rows * width - (real + n) > _MAX_PADDING * (real + n) + _PAD_SLACK * rows):
            batches.append(current)
            current, real = [], 0
        if not current:
            width = n
        current.append(item)
        real += n
    if current:
        batches.append(current)
    return batches


@contextmanager
def inference(model: Any) -> Iterator[None]:
    """The model in eval mode under ``torch.inference_mode``; its training flag is restored afterwards."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def index_batches(order: Sequence[int], batch_size: int) -> Iterator[Sequence[int]]:
    """``order`` in consecutive slices of ``batch_size`` (at least 1) items."""
    step = max(1, batch_size)
    for start in range(0, len(order), step):
        yield order[start : start + step]


def pad_token_id(tokenizer: Any) -> int:
    """The token used to fill padded positions (never scored): pad, else EOS, else BOS, else 0."""
    return _pad_id(tokenizer)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _forward_selected(model: Any, caps: _Caps, keep: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Run the model and return (logits at the ``keep`` positions as (n, vocab), cache)."""
    if caps.keep_mask:
        out = model(logits_to_keep=keep, **kwargs)
        logits = out.logits
        if logits.ndim == 2 and logits.shape[0] == int(keep.sum()):
            return logits, output_cache(out)
        if logits.ndim == 3 and logits.shape[:2] == keep.shape:
            return logits[keep], output_cache(out)
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)} with logits_to_keep mask")
    out = model(**kwargs)
    return out.logits[keep], output_cache(out)


def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (log-prob of the target, target is the argmax), log-softmax in float32."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, targets[:, None]).squeeze(1)
    greedy = logprobs.argmax(dim=-1) == targets
    return picked, greedy


def _tally(logits: torch.Tensor, targets: list[int], owners: list[_Item], totals: dict[int, list[Any]]) -> None:
    """Score each logit row against its target token and add it to its item's running
    ``[item, summed log-prob, every token greedy]`` in ``totals`` (keyed by item index)."""
    picked, greedy = _score(logits, torch.tensor(targets, dtype=torch.long, device=logits.device))
    for it, lp, gr in zip(owners, picked.tolist(), greedy.tolist(), strict=True):
        acc = totals.setdefault(it.index, [it, 0.0, True])
        acc[1] += lp
        acc[2] = acc[2] and gr


def _results(totals: dict[int, list[Any]]) -> list[tuple[_Item, LoglikelihoodResult]]:
    return [(it, LoglikelihoodResult(float(lp), bool(gr), len(it.continuation))) for it, lp, gr in totals.values()]


def _score_batch(model: Any, batch: list[_Group], caps: _Caps, pad_id: int) -> list[tuple[_Item, LoglikelihoodResult]]:
    device = _device(model)
    n = len(batch)
    need_cache = any(g.shared and any(len(it.continuation) > 1 for it in g.items) for g in batch)
    # Tokens every prefix of the batch starts with (a few-shot block, a fixed primer) run once, batch 1.
    head = _shared_head(batch) if caps.cache and n > 1 else 0
    if head and caps.window is not None:
        # Padding between the cached head and a row's tokens counts towards the window in transformers'
        # own mask (it measures distance in indices): share the head only if the window cannot bind.
        longest = max(len(it.continuation) for g in batch for it in g.items)
        if max(len(g.prefix) for g in batch) + longest > caps.window:
            head = 0
    cache = _prefill(model, caps, batch[0].prefix[:head], n) if head else None
    rests = [g.prefix[head:] for g in batch]
    width = max(len(p) for p in rests)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    keep = torch.zeros((n, width), dtype=torch.bool)
    for r, (g, p) in enumerate(zip(batch, rests, strict=True)):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
        keep[r, width - g.keep:] = True
    position_ids = head + (mask.cumsum(1) - 1).clamp(min=0)
    if head:  # the cached head is part of every row's past: unmasked, positions 0..head-1
        mask = torch.cat([torch.ones((n, head), dtype=torch.long), mask], dim=1)
        position_ids = torch.cat([torch.arange(head).expand(n, head), position_ids], dim=1)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "position_ids": position_ids[:, head:].to(device)}
    if bool((mask == 0).any()) or head:
        kwargs["attention_mask"] = mask.to(device)
    if caps.cache:
        kwargs["use_cache"] = need_cache or bool(head)
    if cache is not None:
        kwargs[caps.cache_arg] = cache
    logits, cache = _forward_selected(model, caps, keep.to(device), **kwargs)

    # First-pass targets: for a lone request every continuation token; for a shared group, each choice's
    # first token is scored against the context's last logits (one row reused per choice).
    rows: list[int] = []
    targets: list[int] = []
    owners: list[_Item] = []
    offset = 0
    for g in batch:
        if g.shared:
            for it in g.items:
                rows.append(offset)
                targets.append(it.continuation[0])
                owners.append(it)
        else:
            it = g.items[0]
            rows.extend(range(offset, offset + g.keep))
            targets.extend(it.continuation)
            owners.extend([it] * g.keep)
        offset += g.keep
    totals: dict[int, list[Any]] = {}
    _tally(logits[torch.tensor(rows, device=logits.device)], targets, owners, totals)

    if need_cache:
        _score_continuations(model, batch, caps, cache, mask, position_ids, totals, pad_id)

    return _results(totals)


def _score_continuations(model: Any, batch: list[_Group], caps: _Caps, cache: Any, mask: torch.Tensor,
                         position_ids: torch.Tensor, totals: dict[int, list[Any]], pad_id: int) -> None:
    """Second pass: each shared group's choices (tokens 2..n) against a copy of the group's context cache."""
    device = _device(model)
    members = [(r, it) for r, g in enumerate(batch) if g.shared for it in g.items if len(it.continuation) > 1]
    members.sort(key=lambda m: -len(m[1].continuation))
    widths = [len(it.continuation) - 1 for _, it in members]
    max_rows = max(1, _MAX_LOGIT_POSITIONS // widths[0]) if members else 1
    chunks = _chunk(members, widths, max_rows)
    for c, chunk in enumerate(chunks):
        last = c == len(chunks) - 1
        width = len(chunk[0][1].continuation) - 1
        n = len(chunk)
        group_rows = torch.tensor([r for r, _ in chunk], dtype=torch.long)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        own = torch.zeros((n, width), dtype=torch.long)
        keep = torch.zeros((n, width), dtype=torch.bool)
        targets: list[int] = []
        for j, (_, it) in enumerate(chunk):
            k = len(it.continuation) - 1
            ids[j, :k] = torch.tensor(it.continuation[:-1], dtype=torch.long)
            own[j, :k] = 1
            keep[j, :k] = True
            targets.extend(it.continuation[1:])
        past_mask = mask[group_rows]
        positions = position_ids[group_rows, -1:] + 1 + torch.arange(width)[None, :]
        sub_cache = _select_cache(cache, group_rows.to(device), copy=not last)
        logits, _ = _forward_selected(
            model, caps, keep.to(device), input_ids=ids.to(device),
            attention_mask=torch.cat([past_mask, own], dim=1).to(device),
            position_ids=positions.to(device), use_cache=True, **{caps.cache_arg: sub_cache},
        )
        owners = [it for _, it in chunk for _ in range(len(it.continuation) - 1)]
        _tally(logits, targets, owners, totals)


# --------------------------------------------------------------------------------------------- packed


def _score_packed(model: Any, batch: list[_Group], caps: _Caps, pad_id: int) -> list[tuple[_Item, LoglikelihoodResult]]:
    """One row per question: ``[context | choice 1 | choice 2 | ...]`` (each choice without its last token),
    with position ids restarting after the context for every choice and a 4-D attention mask that lets a
    choice see the context and its own earlier tokens only. Every choice is then scored exactly as if it
    ran alone after the context, in a single forward pass with no duplicated context and no cache copies.
    A head shared by the whole batch (few-shot block) is computed once and passed as the cache."""
    device = _device(model)
    n = len(batch)
    head = min(_common_length([g.row for g in batch]), *(len(g.context) - 1 for g in batch)) if n > 1 else 0
    head = head if head >= _MIN_SHARED_HEAD and caps.cache else 0
    if caps.window is not None and head >= caps.window - 1:
        head = 0  # a sliding-window cache layer would keep only the head's last window - 1 tokens
    cache = _prefill(model, caps, batch[0].context[:head], n) if head else None
    width = max(len(g.row) for g in batch) - head
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # 0: context, k: choice k, -1: padding
    keep = torch.zeros((n, width), dtype=torch.bool)
    # (item, kept-position index of each of its continuation tokens), resolved after the forward pass
    plan: list[tuple[_Item, list[tuple[int, int]]]] = []
    for r, g in enumerate(batch):
        ctx_len = len(g.context)
        ids[r, : ctx_len - head] = torch.tensor(g.context[head:], dtype=torch.long)
        positions[r, : ctx_len - head] = torch.arange(head, ctx_len)
        segment[r, : ctx_len - head] = 0
        keep[r, ctx_len - head - 1] = True
        col = ctx_len - head
        for k, it in enumerate(g.items, start=1):
            seg = it.continuation[:-1]
            if seg:
                ids[r, col: col + len(seg)] = torch.tensor(seg, dtype=torch.long)
                positions[r, col: col + len(seg)] = torch.arange(ctx_len, ctx_len + len(seg))
                segment[r, col: col + len(seg)] = k
                keep[r, col: col + len(seg)] = True
            # token 0 is predicted by the context's last position, token j by the choice's (j-1)-th position
            plan.append((it, [(r, ctx_len - head - 1)] + [(r, col + j) for j in range(len(seg))]))
            col += len(seg)
    mask = _packed_mask(segment, positions, head, _dtype(model), caps.attention)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "position_ids": positions.to(device),
                              "attention_mask": _to_device(mask, device)}
    if cache is not None:
        kwargs.update({caps.cache_arg: cache, "use_cache": True})
    elif caps.cache:
        kwargs["use_cache"] = False
    logits, _ = _forward_selected(model, caps, keep.to(device), **kwargs)

    flat = torch.full((n, width), -1, dtype=torch.long)
    flat[keep] = torch.arange(int(keep.sum()))
    rows, targets, owners = [], [], []
    for it, spots in plan:
        for (r, c), tok in zip(spots, it.continuation, strict=True):
            rows.append(int(flat[r, c]))
            targets.append(tok)
            owners.append(it)
    totals: dict[int, list[Any]] = {}
    _tally(logits[torch.tensor(rows, device=logits.device)], targets, owners, totals)
    return _results(totals)


def _packed_mask(segment: torch.Tensor, positions: torch.Tensor, head: int, dtype: torch.dtype,
                 attention: _Attention) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive (0 / -large) mask of shape (rows, 1, width, head + width): a query sees the shared head, the
    context up to itself, and earlier tokens of its own choice; padding sees only itself (no empty rows).

    A sliding window ``w`` is applied on *position* distance, ``pos(query) - pos(key) < w`` (transformers'
    ``sliding_window_overlay``), so a choice sees exactly the context tokens it would see alone. With
    several layer types the result is a dict of masks keyed by layer type."""
    n, width = segment.shape
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]  # key <= query
    q, k = segment[:, :, None], segment[:, None, :]
    base = causal[None] & ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)
    key_pos = torch.cat([torch.arange(head).expand(n, head), positions], dim=1)
    distance = positions[:, :, None] - key_pos[:, None, :]  # (rows, width, head + width)
    eye = torch.eye(width, dtype=torch.bool)[None]
    masks: dict[str, torch.Tensor] = {}
    for kind, window in attention.windows.items():
        allowed = base | eye
        if head:
            allowed = torch.cat([torch.ones((n, width, head), dtype=torch.bool), allowed], dim=2)
        if window is not None:  # a token's distance to itself is 0: no row becomes empty
            allowed &= distance < window
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        masks[kind] = mask[:, None]
    if attention.per_type:
        return masks
    return next(iter(masks.values()))


def _to_device(mask: torch.Tensor | dict[str, torch.Tensor], device: torch.device) -> Any:
    if isinstance(mask, dict):
        return {k: v.to(device) for k, v in mask.items()}
    return mask.to(device)


class Strategy(NamedTuple):
    """The scoring strategy used for a model, and why (shown in progress lines, protocols and benches)."""

    name: str
    reason: str


class _Probe(NamedTuple):
    exact: bool  # packed scoring equals one sequence per request on this model
    reason: str


#: Probe results per model object (weak keys: a freed model's entry goes with it).
_PACKED_SUPPORT: weakref.WeakKeyDictionary[Any, _Probe] = weakref.WeakKeyDictionary()


def choose_strategy(model: Any, pad_token_id: int = 0) -> str:
    """The fastest strategy this model scores exactly (see :func:`resolve_strategy`)."""
    return resolve_strategy(model, "auto", pad_token_id).name


def resolve_strategy(model: Any, requested: str = "auto", pad_token_id: int = 0) -> Strategy:
    """The strategy ``model`` is scored with, and the reason.

    ``"auto"``: ``packed`` when the forward takes position ids, a 4-D mask and a KV cache, the attention
    rule can be stated in a packed mask and a probe confirms it; else ``shared-context`` with a KV cache,
    else ``full``. A forced strategy that would be inexact (``packed`` where ``auto`` refuses it,
    ``shared-context`` without a KV cache) raises a one-line :class:`~rankwise.errors.RankwiseError`.
    The probe runs once per model object.
    """
    if requested not in STRATEGIES:
        raise RankwiseError(f"unknown scoring strategy {requested!r}: one of {', '.join(STRATEGIES)}")
    name = type(model).__name__
    caps = _capabilities(model)
    if not caps.cache:
        auto = Strategy("full", f"{name}.forward takes no KV cache, so no context can be shared: "
                                "one sequence per request")
    else:
        probe = _packed_probe(model, caps, pad_token_id)
        auto = (Strategy("packed", probe.reason) if probe.exact
                else Strategy("shared-context", f"not packed: {probe.reason}"))
    if requested in ("auto", auto.name):
        return auto
    if requested == "full":
        return Strategy("full", f"requested (auto would use {auto.name})")
    if requested == "shared-context" and caps.cache:
        return Strategy("shared-context", "requested (auto would use packed)")
    raise RankwiseError(f"strategy '{requested}' would not be exact for {name}: {auto.reason}")


def _packed_probe(model: Any, caps: _Caps, pad_id: int) -> _Probe:
    try:
        hit = _PACKED_SUPPORT.get(model)
    except TypeError:  # not weak-referenceable: probe every time
        return _probe_packed(model, caps, pad_id)
    if hit is None:
        hit = _PACKED_SUPPORT[model] = _probe_packed(model, caps, pad_id)
    return hit


#: Messages of ValueError/RuntimeError that mean "this forward cannot take this mask or these position ids"
#: (transformers' mask checks, a 4-D mask against a 2-D expectation, a broadcast over the key axis).
_INCOMPATIBLE_MESSAGE = re.compile(r"attention[_ ]?mask|causal[_ ]?mask|position[_ ]?ids|\bmask\b.*shape|"
                                   r"shape.*\bmask\b|non-singleton dimension 3", re.IGNORECASE)


def _is_incompatibility(exc: BaseException, attention: _Attention) -> bool:
    """True for errors that say the forward cannot take a custom 4-D mask or explicit position ids; every
    other error (a real bug in the model or in rankwise) must surface, not turn into a slower strategy."""
    message = str(exc)
    if isinstance(exc, TypeError):
        return "unexpected keyword argument" in message or "got multiple values for" in message
    if isinstance(exc, ValueError | RuntimeError):
        return bool(_INCOMPATIBLE_MESSAGE.search(message))
    if isinstance(exc, AttributeError) and attention.per_type:  # a dict of per-layer-type masks refused
        return "'dict' object" in message
    return False


def _probe_packed(model: Any, caps: _Caps, pad_id: int) -> _Probe:
    """Whether packed scoring is exact on this model: static reasons first, then a numerical check.

    Two questions share a 32-token head (the few-shot path, run from a cache) and have two 3-token choices
    each; with a sliding window of at most 64 tokens the contexts are made longer than the window, so the
    window's rule is checked as well. Each choice must score as it does alone within 1e-4 relative (float32;
    0.05 in 16-bit formats)."""
    if not caps.position_ids:
        return _Probe(False, "the forward takes no position_ids, which packing restarts for every choice")
    if caps.attention.problem:
        return _Probe(False, caps.attention.problem)
    vocab = getattr(_text_config(model), "vocab_size", None) or 100
    g = torch.Generator().manual_seed(0)
    window = caps.window
    ctx_len = max(_MIN_SHARED_HEAD + 3, window + 2 if window is not None and window <= 64 else 0)
    toks = [int(t) for t in torch.randint(0, min(int(vocab), 1000), (ctx_len + 16,), generator=g)]
    ctx_a = tuple(toks[:ctx_len])
    ctx_b = tuple(toks[:_MIN_SHARED_HEAD]) + tuple(toks[ctx_len: ctx_len + ctx_len - _MIN_SHARED_HEAD])
    conts = [tuple(toks[-12:-9]), tuple(toks[-9:-6]), tuple(toks[-6:-3]), tuple(toks[-3:])]
    items = [_Item(0, ctx_a, conts[0]), _Item(1, ctx_a, conts[1]), _Item(2, ctx_b, conts[2]),
             _Item(3, ctx_b, conts[3])]
    groups = [_Group(ctx_a, items[:2]), _Group(ctx_b, items[2:])]
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            packed = _score_packed(model, groups, caps, pad_id)
            alone = [r for it in items for r in _score_batch(model, [_Group(it.context, [it])], caps, pad_id)]
    except Exception as exc:
        if not _is_incompatibility(exc, caps.attention):
            raise
        return _Probe(False, f"the forward refuses a 4-D attention mask or position ids "
                             f"({type(exc).__name__}: {first_line(exc)[:160]})")
    finally:
        if was_training:
            model.train()
    got = {it.index: r.logprob for it, r in packed}
    want = {it.index: r.logprob for it, r in alone}
    tol = 1e-4 if _dtype(model) in (torch.float32, torch.float64) else 5e-2
    worst = max(abs(got[i] - want[i]) / max(1.0, abs(want[i])) for i in want)
    if worst > tol:
        return _Probe(False, f"a probe's packed scores differ from one sequence per request "
                             f"(relative {worst:.1e} > {tol:g}) with {caps.attention.describe()}")
    how = ("one mask per layer type" if caps.attention.per_type else "the window in the mask"
           if caps.window is not None else "causal mask")
    return _Probe(True, f"context once, choices packed after it ({caps.attention.describe()}: {how}; "
                        f"probe equal to one sequence per request)")


def _dtype(model: Any) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return torch.float32


def _select_cache(cache: Any, rows: torch.Tensor, copy: bool) -> Any:
    """The cache rows ``rows`` (repeats allowed), as a new cache; the original stays usable if ``copy``."""
    if isinstance(cache, tuple):  # legacy tuple-of-(k, v) caches
        return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)
    target = _shallow_cache_copy(cache) if copy else cache
    target.batch_select_indices(rows)
    return target


def _shallow_cache_copy(cache: Any) -> Any:
    """A copy whose layers can be re-indexed without touching the original (tensors are shared, not cloned)."""
    import copy as _copy

    new = _copy.copy(cache)
    if hasattr(cache, "layers"):
        new.layers = [_copy.copy(layer) for layer in cache.layers]
    else:  # pragma: no cover - older cache classes keep tensors in lists
        for attr in ("key_cache", "value_cache"):
            if hasattr(cache, attr):
                setattr(new, attr, list(getattr(cache, attr)))
    return new


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
