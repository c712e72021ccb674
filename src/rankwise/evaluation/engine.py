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

Which strategy a model gets is decided by a probe the first time it is scored (:func:`choose_strategy`):
a model that does not accept custom 4-D masks falls back to "shared-context" (the context's key/value
cache copied per choice; contexts left-padded with explicit position ids) and a model without a cache to
"full" (one sequence per request, like lm-eval). A forward without ``logits_to_keep`` is handled by slicing
the full logits. All strategies agree with lm-eval to float rounding (tests check 1e-4 between them).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

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

    caps = _capabilities(model)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            if strategy == "auto":
                strategy = choose_strategy(model, pad_token_id)
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
class _Caps:
    cache_arg: str | None  # the forward's KV-cache argument ("cache" or "past_key_values"), None: no cache
    keep_mask: bool  # forward takes logits_to_keep (a boolean mask is tried, then checked)

    @property
    def cache(self) -> bool:
        return self.cache_arg is not None


def _truncate(ctx: list[int], cont: list[int], max_length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """lm-eval's left truncation: keep the last ``max_length + 1`` tokens of context + continuation."""
    whole = (ctx + cont)[-(max_length + 1):]
    return tuple(whole[: len(whole) - len(cont)]), tuple(cont)


def _capabilities(model: Any) -> _Caps:
    caps = forward_caps(model)
    return _Caps(cache_arg=caps.cache_arg if caps.kv_cache else None, keep_mask=caps.logits_to_keep)


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
    mask = _packed_mask(segment, head, _dtype(model))
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "position_ids": positions.to(device),
                              "attention_mask": mask.to(device)}
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


def _packed_mask(segment: torch.Tensor, head: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (0 / -large) mask of shape (rows, 1, width, head + width): a query sees the shared head, the
    context up to itself, and earlier tokens of its own choice; padding sees only itself (no empty rows)."""
    n, width = segment.shape
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]  # key <= query
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = causal[None] & ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)[None]
    if head:
        allowed = torch.cat([torch.ones((n, width, head), dtype=torch.bool), allowed], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


#: Probe results per model object (weak keys: a freed model's entry goes with it).
_PACKED_SUPPORT: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def choose_strategy(model: Any, pad_token_id: int = 0) -> str:
    """The fastest strategy this model scores exactly: ``packed`` if a probe (a context with two choices)
    gives the same log-likelihoods packed as one sequence per request, else ``shared-context`` when the
    model has a key/value cache, else ``full``. The probe runs once per model object."""
    caps = _capabilities(model)
    try:
        supported = _PACKED_SUPPORT.get(model)
        if supported is None:
            supported = _PACKED_SUPPORT[model] = _probe_packed(model, caps, pad_token_id)
    except TypeError:  # not weak-referenceable: probe every time
        supported = _probe_packed(model, caps, pad_token_id)
    if supported:
        return "packed"
    return "shared-context" if caps.cache else "full"


def _probe_packed(model: Any, caps: _Caps, pad_id: int) -> bool:
    if getattr(getattr(model, "config", None), "sliding_window", None):  # a custom mask would bypass it
        return False
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
    g = torch.Generator().manual_seed(0)
    toks = [int(t) for t in torch.randint(0, min(int(vocab), 1000), (14,), generator=g)]
    items = [_Item(0, tuple(toks[:6]), tuple(toks[6:10])), _Item(1, tuple(toks[:6]), tuple(toks[10:14]))]
    try:
        with torch.inference_mode():
            packed = _score_packed(model, [_Group(items[0].context, items)], caps, pad_id)
            alone = [r for it in items for r in _score_batch(model, [_Group(it.context, [it])], caps, pad_id)]
    except Exception:  # a model that rejects 4-D masks or position ids: use another strategy
        return False
    got = {it.index: r.logprob for it, r in packed}
    want = {it.index: r.logprob for it, r in alone}
    return all(abs(got[i] - want[i]) < 1e-3 * max(1.0, abs(want[i])) for i in want)


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
