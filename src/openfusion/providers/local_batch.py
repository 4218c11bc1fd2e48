"""Several short answers to one prompt, decoded together in one llama.cpp context.

The local preset asks one model the same question three times (a greedy member and two
sampled ones). Decoded one after the other, each answer pays a full forward pass per token;
decoded together, one pass per step serves every answer (a step over 3 tokens costs little
more than over 1 on a small model), so the panel takes about as long as its longest answer.

How (:func:`decode_together`): the prompt is evaluated once as sequence 0, where llama.cpp's
prompt cache (``Llama.generate``) and the judge's scoring (``_mean_logprob``) expect it; each
answer is a sequence of its own (1, 2, ...) that starts from a copy of the prompt's KV cells
(``llama_memory_seq_cp``). Each step sends one token per live sequence in one
``llama_batch`` and samples each from its own logits row. When all are done their cells are
removed, and sequence 0 holds exactly the prompt again.

Each sequence has a KV buffer of its own (llama.cpp's non-unified cache, one *stream* per
sequence, see :func:`enable_sequences`), so an answer's cells lie exactly where they would
if it were decoded alone. That is what keeps a greedy answer the same token for token: with
one shared buffer the answers' cells interleave, the attention sums add the same terms in
another order, and the logits move by up to ~0.5 — enough to flip a near-tie (on 100
held-out TriviaQA questions the greedy member's answer changed 4 times; with a buffer per
sequence, none did). The price: ``n_ctx`` cells of memory for every sequence, and copying
the prompt's buffer to each (llama.cpp copies a whole stream), which made a panel of three
~0.1 s slower than with the shared buffer.

Sampling (:class:`Sampler`) is numpy over the logits row, with the steps and defaults of
llama-cpp-python's chain for ``create_completion`` (top-k 40, top-p, min-p 0.05, then the
temperature, then a draw; temperature 0 is the arg-max). It differs from that chain in the
random source: a ``numpy.random.Generator`` seeded with the request's seed, not llama.cpp's
mt19937, so a seed gives the same answer every time on this path but not the same answer as
on the one-at-a-time path; and it has no repetition or presence/frequency penalties and no
logit bias (requests that ask for those are decoded alone). A greedy answer is the
one-at-a-time path's token for token (tests/test_local_batch.py checks it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy comes with the [local] extra (llama-cpp-python needs it)
    import numpy as np
    import numpy.typing as npt

TOP_K = 40
MIN_P = 0.05
TOP_P = 0.95
"""llama-cpp-python's ``create_completion`` defaults, kept so both paths sample alike."""


class Sampler:
    """One sequence's token choice from a row of logits: arg-max at temperature 0, else
    top-k, top-p and min-p on the softmax of the raw logits, then the temperature, then a
    draw from a generator seeded per request (``seed=None``: a fresh random one)."""

    def __init__(self, temperature: float, top_p: float | None, seed: int | None) -> None:
        self.temperature = temperature
        self.top_p = TOP_P if top_p is None else top_p
        import numpy as np

        self._rng = np.random.default_rng(seed)

    def __call__(self, logits: npt.NDArray[np.float32]) -> int:
        import numpy as np

        if self.temperature <= 0:
            return int(np.argmax(logits))
        k = min(TOP_K, logits.shape[0])
        top = np.argpartition(logits, -k)[-k:]
        top = top[np.argsort(-logits[top], kind="stable")]  # best first
        raw = logits[top].astype(np.float64)
        probs = np.exp(raw - raw[0])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)  # >= top_p, >= 1
        keep = max(1, min(keep, k))
        keep = max(1, int(np.count_nonzero(probs[:keep] >= MIN_P * probs[0])))
        scaled = raw[:keep] / self.temperature
        weights = np.exp(scaled - scaled[0])
        weights /= weights.sum()
        return int(top[self._rng.choice(keep, p=weights)])


@dataclasses.dataclass(eq=False)
class Answer:
    """One answer being written: how it samples, where it stops, and what it wrote."""

    sampler: Sampler
    max_tokens: int
    stop: tuple[str, ...]
    cancelled: threading.Event
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish: str | None = None


def enable_sequences(llm: Any, n_seq_max: int) -> None:
    """Give ``llm`` a context that holds ``n_seq_max`` sequences (ids ``0 .. n_seq_max - 1``:
    the prompt's and ``n_seq_max - 1`` answers), each in a KV buffer of the ``n_ctx`` cells
    ``llm`` was made with (``Llama(...)`` has no argument for it: the context it made is
    replaced, before first use). Sequence 0 — everything but the batches — sees the same
    context as before."""
    from llama_cpp import _internals

    params = llm.context_params
    params.n_seq_max = n_seq_max
    params.kv_unified = False  # a buffer per sequence: see the module's docstring
    params.n_ctx = llm._n_ctx * n_seq_max  # llama.cpp splits n_ctx between the sequences
    old = llm._ctx
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
    old.close()  # the new context is freed with the model (LlamaContext registers it there)
    llm.n_tokens = 0
    llm._requires_eval = True


def prompt_tokens(llm: Any, prompt: str) -> list[int]:
    """The prompt's tokens as ``create_completion`` evaluates them (BOS, special tokens read)."""
    return list(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))


def decode_together(llm: Any, tokens: Sequence[int], sequences: Sequence[Answer]) -> None:
    """Write every sequence's answer to the prompt ``tokens``, one batched step per token.

    On return each sequence has its ``tokens``, ``text`` (cut before the first stop string)
    and ``finish`` (``stop``, ``length`` or ``cancelled``); the context holds the prompt as
    sequence 0 and nothing else, and ``llm``'s own bookkeeping says so.
    """
    import llama_cpp
    import numpy as np

    ids = range(1, len(sequences) + 1)
    vocab = llm.n_vocab()
    memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
    batch = llama_cpp.llama_batch_init(len(sequences), 0, 1)
    try:
        _evaluate_prompt(llm, tokens)
        first = np.array(_logits(llm, -1, vocab), copy=True)
        for seq_id in ids:
            llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, 0, seq_id, -1, -1)
        live: list[tuple[int, Answer]] = []
        for seq_id, seq in zip(ids, sequences, strict=True):
            if _advance(llm, tokens, seq, seq.sampler(first)):
                live.append((seq_id, seq))
        position = len(tokens)
        while live:
            batch.n_tokens = len(live)
            for row, (seq_id, seq) in enumerate(live):
                batch.token[row] = seq.tokens[-1]
                batch.pos[row] = position
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = seq_id
                batch.logits[row] = True
            code = llama_cpp.llama_decode(llm._ctx.ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            position += 1
            live = [
                (seq_id, seq)
                for row, (seq_id, seq) in enumerate(live)
                if _advance(llm, tokens, seq, seq.sampler(_logits(llm, row, vocab)))
            ]
    finally:
        llama_cpp.llama_batch_free(batch)
        for seq_id in ids:  # the answers go; the prompt stays for the next call to reuse
            llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
        llm._requires_eval = True  # the context's last logits are an answer's, not the prompt's


def _evaluate_prompt(llm: Any, tokens: Sequence[int]) -> None:
    """Sequence 0 holds ``tokens`` with the last one evaluated now (its logits are needed);
    whatever prefix the previous call left in the cache is reused."""
    cached = reuse_prefix(llm, tokens)
    llm.eval(list(tokens[cached:]))  # drops sequence 0's cells past the shared prefix first


def reuse_prefix(llm: Any, tokens: Sequence[int]) -> int:
    """How many of ``tokens`` (all but the last, whose logits are wanted) the context holds
    from the previous call; ``llm`` is told to keep those and evaluate from there."""
    cached = 0
    for a, b in zip(llm._input_ids, tokens[:-1], strict=False):
        if a != b:
            break
        cached += 1
    llm.n_tokens = cached
    return cached


def _logits(llm: Any, row: int, vocab: int) -> npt.NDArray[np.float32]:
    import llama_cpp
    import numpy as np

    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, row)
    if not pointer:
        raise RuntimeError(f"llama.cpp has no logits for batch row {row}")
    return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (vocab,))


def _advance(llm: Any, prompt: Sequence[int], seq: Answer, token: int) -> bool:
    """Take ``token`` into ``seq``; whether it goes on (not stopped, cancelled or full)."""
    import llama_cpp

    if seq.cancelled.is_set():
        seq.finish = "cancelled"
        return False
    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
        seq.finish = "stop"
        return False
    seq.tokens.append(token)
    written = llm.detokenize(seq.tokens, prev_tokens=list(prompt))
    text = written.decode("utf-8", errors="ignore")
    cuts = [i for i in (text.find(s) for s in seq.stop if s) if i >= 0]
    if cuts:
        seq.text, seq.finish = text[: min(cuts)], "stop"
        return False
    seq.text = text
    if len(seq.tokens) >= seq.max_tokens:
        seq.finish = "length"
        return False
    return True
