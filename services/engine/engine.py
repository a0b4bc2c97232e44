"""The engine's public face: load a model, generate with or without drafting."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from kernels import backend as kernels_backend
from services.common.params import DraftConfig, SamplingParams
from services.common.speedup import bucket
from services.engine import checkpoint
from services.engine.detokenizer import OutputText, decode
from services.engine.drafting.costs import Costs
from services.engine.drafting.step import Speculator, first_token
from services.engine.drafting.telemetry import Telemetry
from services.engine.kv_pool import BlockTable, KVPool
from services.engine.model import Model
from services.engine.runner import ModelRunner
from services.engine.scheduler import Request, Scheduler
from services.engine.sequence import Sequence

log = logging.getLogger(__name__)

PROFILES = Path(__file__).parent / "profiles"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: dict


def profile_path(model_path: Path) -> Path:
    """Where the tuned drafting profile of a model lives: shipped ones first."""
    if model_path.parent == checkpoint.cache_dir():  # a converted GGUF: <stem>-<hash>
        shipped = PROFILES / f"{model_path.name.rsplit('-', 1)[0]}.json"
        if shipped.is_file():
            return shipped
    return model_path / "selfspec_profile.json"


class Engine:
    """A model, its KV pool and its default drafting, ready to generate."""

    def __init__(
        self,
        model: Model,
        tokenizer,
        model_path: Path,
        *,
        kv_cache_bytes: int = 1 << 30,
        block_size: int = 16,
        prefill_chunk: int = 512,
        max_waiting: int = 256,
        draft: DraftConfig | None = None,
        allow_draft_override: bool = True,
        max_draft_configs: int = 4,
    ) -> None:
        """`allow_draft_override`: whether requests through `submit` (servers) may carry
        their own drafting; `max_draft_configs`: distinct drafting configs run in one step,
        each a pass of its own (requests beyond run with the default, and say so)."""
        if max_draft_configs < 1:
            raise ValueError(f"max_draft_configs must be at least 1, got {max_draft_configs}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.prefill_chunk = prefill_chunk
        self.allow_draft_override = allow_draft_override
        self.max_draft_configs = max_draft_configs
        self.pool = KVPool.from_budget(
            kv_cache_bytes,
            num_layers=model.num_layers,
            kv_dim=model.kv_dim,
            block_size=block_size,
            dtype=model.kv_dtype,
            device=model.device,
        )
        self.runner = ModelRunner(model, self.pool)
        self.drafting = Speculator(self.runner, model.max_positions)
        self.default_draft = draft or self._load_profile()
        self.default_draft.check_layers(model.num_layers)
        eos = model.config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(e for e in eos if e is not None)
        self._ids = itertools.count()
        self.scheduler = Scheduler(self.pool, max_waiting=max_waiting)
        self._step_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Requests that failed in a row, with none completing between: for health checks.
        self.consecutive_failures = 0
        self.finished: Counter[str] = Counter()  # requests ended, by finish reason

    @classmethod
    def from_pretrained(
        cls,
        model: str = "default",
        *,
        dtype: str = "bfloat16",
        device: str = "cpu",
        backend: str | None = None,
        **kwargs,
    ) -> Engine:
        """Load `model`: `default`, a Hugging Face checkpoint folder, or a GGUF file.
        `backend`: the compute path (`kernels.backend`; default: `SELFSPEC_BACKEND`, else
        the fastest this machine runs)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        chosen = kernels_backend.choose(DTYPES[dtype], device, backend)
        path = checkpoint.resolve(model)
        config = checkpoint.load_config(path)
        weights = Model(config, checkpoint.load_tensors(path), chosen)
        tokenizer = AutoTokenizer.from_pretrained(path)
        log.info("loaded %s in %.2f s", path, time.perf_counter() - t0)
        return cls(weights, tokenizer, path, **kwargs)

    def _load_profile(self) -> DraftConfig:
        path = profile_path(self.model_path)
        if path.is_file():
            profile = json.loads(path.read_text())
            fields, evidence = profile["draft"], profile.get("evidence", {})
            # `auto` leaves the layer draft out where tuning measured it slower than none.
            measured = evidence.get("measured_tokens_per_s", 1.0)
            self.auto_layer_draft = measured > evidence.get("off_tokens_per_s", 0.0)
        else:  # no tuned profile: skip the attention of every other middle layer
            n = self.model.num_layers
            fields = {"skip_attn": tuple(range(n // 4, 3 * n // 4, 2))}
        return DraftConfig(**{**fields, "mode": "auto"})

    # -- requests ---------------------------------------------------------------

    def encode(self, prompt: str | list[int] | list[dict], chat: bool = False) -> list[int]:
        """Token ids of a prompt: text (wrapped as one user turn when `chat`), token ids, or
        chat messages (`{"role", "content"}` dicts, formatted with the chat template)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if chat:
                return self.encode([{"role": "user", "content": prompt}])
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = self._apply_chat_template(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(
                f"token ids must be integers in [0, {self.model.vocab_size}); got {bad[:5]}"
            )
        return ids

    def _apply_chat_template(self, messages: list[dict]) -> list[int]:
        for i, m in enumerate(messages):
            if set(m) != {"role", "content"} or not all(isinstance(v, str) for v in m.values()):
                raise ValueError(f"messages[{i}] must have string 'role' and 'content' only")
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(
                    f"messages[{i}].role must be system, user or assistant, not {m['role']!r}"
                )
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _check_fits(self, prompt: list[int], params: SamplingParams) -> None:
        limit = self.model.max_positions
        if len(prompt) >= limit:
            raise ValueError(f"prompt has {len(prompt)} tokens; the model's context is {limit}")
        if len(prompt) + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {limit} tokens; "
                f"lower max_tokens to at most {limit - len(prompt)}"
            )

    def add_request(
        self,
        prompt: str | list[int] | list[dict],
        params: SamplingParams | None = None,
        draft: DraftConfig | str | dict | None = None,
        *,
        chat: bool = False,
        request_id: str | None = None,
        session_id: str | None = None,
        on_update: Callable[[Sequence, bool], None] | None = None,
    ) -> Sequence:
        """Validate and queue one request; `on_update(seq, finished)` runs on the engine's
        thread after every step that changes it. Raises ValueError or QueueFull."""
        params = params or SamplingParams()
        cfg = DraftConfig.parse(draft, self.default_draft)
        cfg.check_layers(self.model.num_layers)
        ids = self.encode(prompt, chat)
        self._check_fits(ids, params)
        request = Request(
            request_id or f"req-{next(self._ids)}", ids, params, cfg, session_id, on_update
        )
        seq = Sequence(
            request.request_id,
            ids,
            params,
            BlockTable(self.pool),
            text=OutputText(self.tokenizer, params.stop),
        )
        seq.need = min(len(ids) + params.max_tokens + cfg.max_draft + 1, self.model.max_positions)
        self.scheduler.add(request, seq)
        self._wake.set()
        return seq

    def generate(
        self,
        prompts: list[str | list[int]] | str,
        params: SamplingParams | None = None,
        draft: DraftConfig | str | dict | None = None,
        *,
        chat: bool = False,
        session_id: str | None = None,
    ) -> list[Completion]:
        """One completion per prompt; prompts are batched together as the pool allows."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        done = threading.Event()
        seqs: list[Sequence] = []
        added = []
        try:
            for p in prompts:
                seq = self.add_request(
                    p,
                    params,
                    draft,
                    chat=chat,
                    session_id=session_id,
                    on_update=lambda s, finished: finished and _all_done(seqs, len(prompts), done),
                )
                seqs.append(seq)
                added.append(seq)
        except Exception:
            for seq in added:
                self.abort(seq.id)
            if self._thread is None:
                while self.scheduler.has_work:
                    self.step_once()
            raise
        _all_done(seqs, len(prompts), done)
        if self._thread is None:
            while not done.is_set():
                self.step_once()
        else:
            done.wait()
        return [self._completion(s) for s in seqs]

    def abort(self, request_id: str) -> bool:
        """Cancel a request; it ends, and its blocks are freed, at the next step boundary.
        Returns False when no request with this id is queued or running."""
        found = self.scheduler.abort(request_id)
        self._wake.set()
        return found

    def stats(self) -> dict:
        """A snapshot of the engine's load and KV cache, for health checks and metrics."""
        sch, pool = self.scheduler, self.pool
        session_blocks = sum(len(c.table.blocks) for c in sch.sessions.values())
        return {
            "waiting": len(sch.waiting),
            "prefilling": len(sch.prefilling),
            "running": len(sch.running),
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_free": pool.num_free,
            "kv_blocks_sessions": session_blocks,
            "kv_blocks_in_use": pool.num_blocks - pool.num_free - session_blocks,
            "sessions": len(sch.sessions),
            "finished": dict(self.finished),
        }

    # -- the loop ------------------------------------------------------------------

    def step_once(self) -> None:
        """One iteration: drop cancelled requests, admit, prefill a chunk, decode a step.
        A failure while serving one request ends that request alone (see `_fail`)."""
        with self._step_lock:
            sch = self.scheduler
            for request, seq in sch.reap_aborted():
                self._done(request, seq)
            for request, seq, exc in sch.admit():
                self._fail(request, seq, exc)
            if sch.prefilling:
                self._prefill_next()
            self._decode()

    def _prefill_next(self) -> None:
        sch = self.scheduler
        request, seq = sch.prefilling[0]
        resumed = bool(seq.output)  # after a preemption: its next token is known
        try:
            logits = self.runner.prefill(seq, self.prefill_chunk)
            if logits is None:  # more chunks to come
                return
            if not resumed:
                seq.append([self._first_token(seq, logits[-1])], self.eos_ids)
        except Exception as exc:
            sch.drop(request, seq)
            self._fail(request, seq, exc)
            return
        if seq.finished:
            sch.drop(request, seq)
            self._done(request, seq)
            return
        sch.start_running(request, seq)
        if not resumed:
            _notify(request, seq, False)

    def _decode(self) -> None:
        """A draft-and-verify step for every running sequence, grouped by drafting config.
        A group whose batched pass fails is retried a sequence at a time, so that only
        the sequence that fails alone is failed."""
        sch = self.scheduler
        for cfg, seqs in self._grow().items():
            states = [_generator_state(s) for s in seqs]
            try:
                self.step(seqs, cfg)
            except Exception as exc:
                if len(seqs) == 1:
                    log.exception("request %s failed", seqs[0].id)
                    seqs[0].finish("error", _describe(exc))
                    continue
                log.warning("a step of %d sequences failed; retrying one at a time", len(seqs))
                for seq, state in zip(seqs, states, strict=True):
                    _restore_generator(seq, state)
                    self._step_alone(seq, cfg)
        for request, seq in sch.settle():
            self._done(request, seq)
        for request, seq in sch.running:
            _notify(request, seq, False)

    def _step_alone(self, seq: Sequence, cfg: DraftConfig) -> None:
        try:
            self.step([seq], cfg)
        except Exception as exc:
            log.exception("request %s failed", seq.id)
            seq.finish("error", _describe(exc))

    def _grow(self) -> dict[DraftConfig, list[Sequence]]:
        """This step's groups, each running sequence with the blocks its step may write;
        the most recently admitted sequences are preempted while the pool is short."""
        sch = self.scheduler
        while True:
            groups = self._groups()
            missing = sum(
                max(
                    0, self.pool.blocks_for(s.num_tokens + self._room(s, cfg)) - len(s.table.blocks)
                )
                for cfg, seqs in groups.items()
                for s in seqs
            )
            if missing <= self.pool.num_free:
                break
            for _, seq in sch.make_room(missing):
                log.info("preempted request %s to free KV blocks", seq.id)
        for cfg, seqs in groups.items():
            for s in seqs:
                s.table.reserve(s.num_tokens + self._room(s, cfg))
        return groups

    def _groups(self) -> dict[DraftConfig, list[Sequence]]:
        """Running sequences by the drafting config they run with this step: their own,
        in order of arrival, up to `max_draft_configs` distinct ones with the default;
        the rest run with the default (their stats say so)."""
        own: dict[DraftConfig, list[Sequence]] = {self.default_draft: []}
        for request, seq in self.scheduler.running:
            if request.draft in own or len(own) < self.max_draft_configs:
                own.setdefault(request.draft, []).append(seq)
            else:
                own[self.default_draft].append(seq)
                seq.stats.draft_fallback = True
        groups: dict[DraftConfig, list[Sequence]] = {}
        for cfg, seqs in own.items():
            if seqs:
                groups.setdefault(self._bucket_draft(cfg, len(seqs)), []).extend(seqs)
        return groups

    def _room(self, seq: Sequence, cfg: DraftConfig) -> int:
        """How many tokens a step may draft for `seq`."""
        context_left = self.model.max_positions - seq.num_tokens
        return max(0, min(cfg.max_draft, seq.remaining - 1, context_left))

    def _fail(self, request: Request, seq: Sequence, exc: Exception) -> None:
        """End one request for a failure while serving it; its blocks and id are freed."""
        log.error("request %s failed: %s", request.request_id, _describe(exc), exc_info=exc)
        seq.finish("error", _describe(exc))
        self._done(request, seq)

    def _done(self, request, seq: Sequence) -> None:
        # A run of failures with no success between is a broken engine, not one bad request.
        if seq.finish_reason == "error":
            self.consecutive_failures += 1
        elif seq.finish_reason != "abort":
            self.consecutive_failures = 0
        self.finished[seq.finish_reason] += 1
        self.scheduler.finish(request, seq)
        _notify(request, seq, True)

    def start(self) -> None:
        """Run the loop in a background thread, for servers (see `submit`)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="selfspec-engine", daemon=True)
            self._thread.start()

    @property
    def serving(self) -> bool:
        """Whether the background loop (see `start`) is running."""
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stopping:
            if not self.scheduler.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step_once()
            except Exception:  # a fault outside any one request: never kill the loop
                log.exception("engine step failed; failing the requests in progress")
                self._fail_all()

    def _fail_all(self) -> None:
        for request, seq in self.scheduler.take_active():
            seq.finish("error", "the engine failed a step; retry")
            self._done(request, seq)

    async def submit(
        self,
        prompt: str | list[int] | list[dict],
        params: SamplingParams | None = None,
        draft: DraftConfig | str | dict | None = None,
        *,
        chat: bool = False,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream a request's output as deltas; the loop runs on the engine's thread, so the
        caller's event loop never blocks. Breaking out of the iteration cancels it."""
        if draft is not None and not self.allow_draft_override:
            raise ValueError(
                "this server takes no per-request draft settings (allow_draft_override is off); "
                "leave draft unset"
            )
        self.start()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        stream = _DeltaStream()

        def on_update(seq: Sequence, finished: bool) -> None:
            delta = stream.delta(seq, finished)
            if delta is not None:
                with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                    loop.call_soon_threadsafe(queue.put_nowait, delta)

        seq = self.add_request(
            prompt,
            params,
            draft,
            chat=chat,
            request_id=request_id,
            session_id=session_id,
            on_update=on_update,
        )
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:
                self.abort(seq.id)

    def step(self, seqs: list[Sequence], cfg: DraftConfig) -> None:
        """Draft for every sequence, verify all drafts in one pass, accept what agrees
        (`drafting.step`). Raises when a batched pass fails, before any sequence changed;
        a failure while accepting for one sequence fails that sequence only."""
        for seq, exc in self.drafting.step(seqs, cfg, self.eos_ids):
            seq.finish("error", _describe(exc))

    _first_token = staticmethod(first_token)

    def _room(self, seq: Sequence, cfg: DraftConfig) -> int:
        """How many tokens a step may draft for `seq`."""
        return self.drafting.room(seq, cfg)

    # The `auto` policy's state, under the names the serving layer and tests use.

    @property
    def telemetry(self) -> Telemetry:
        return self.drafting.policy.telemetry

    @property
    def costs(self) -> Costs:
        return self.drafting.policy.costs

    @costs.setter
    def costs(self, costs: Costs) -> None:
        self.drafting.policy.costs = costs

    @property
    def auto_layer_draft(self) -> bool:
        """Whether `auto` may use the layer draft."""
        return self.drafting.policy.layer_draft

    @auto_layer_draft.setter
    def auto_layer_draft(self, allowed: bool) -> None:
        self.drafting.policy.layer_draft = allowed

    def between_steps(self, fn: Callable, *args):
        """`fn(*args)` run between two steps, for work that borrows the KV pool from
        another thread (the fleet's teacher-forced scoring)."""
        with self._step_lock:
            return fn(*args)

    def _completion(self, seq: Sequence) -> Completion:
        return Completion(
            token_ids=list(seq.output),
            text=seq.text.text if seq.text is not None else decode(self.tokenizer, seq.output),
            finish_reason=seq.finish_reason or "length",
            stats=seq.stats.as_dict(),
        )

    # -- fleet configuration: hooks for services.serve.fleet_link ---------------------------
    # A fleet link applies the controller's versioned configs here, between steps, and
    # scores candidate skip sets in spare moments. With no link nothing below changes
    # what the engine does.

    config_version: int = 0  # the fleet config applied last; 0: none
    _bucket_drafts: Mapping[int, DraftConfig] = MappingProxyType({})

    def apply_draft(
        self,
        cfg: DraftConfig,
        version: int,
        by_bucket: Mapping[int, DraftConfig] | None = None,
    ) -> None:
        """Make `cfg` the default drafting of new requests, with per-batch-bucket variants
        for steps at those batch sizes; running requests keep theirs. Waits for the step
        in progress, so it applies between steps."""
        for c in (cfg, *(by_bucket or {}).values()):
            c.check_layers(self.model.num_layers)
            if c.max_draft > cfg.max_draft:
                raise ValueError("a bucket may not draft more than the base config")
        with self._step_lock:
            self.default_draft = cfg
            self._bucket_drafts = MappingProxyType(dict(by_bucket or {}))
            # The fleet measured that the layer draft pays when it asks `auto` to use one.
            if cfg.mode == "auto" and cfg.layer_mode is not None:
                self.auto_layer_draft = True
            self.config_version = version

    def _bucket_draft(self, cfg: DraftConfig, batch: int) -> DraftConfig:
        """The fleet's variant of the default config for this batch size, if any."""
        if not self._bucket_drafts or cfg is not self.default_draft:
            return cfg
        return self._bucket_drafts.get(bucket(batch), cfg)


@dataclass
class Delta:
    """What a request produced since its last delta."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stats: dict
    error: str | None = None  # why, when finish_reason is "error"


class _DeltaStream:
    """Turns a sequence's growing output into deltas of tokens and text. Text that could
    still become a stop string, or ends inside a character, waits (`OutputText.ready`)."""

    def __init__(self) -> None:
        self.sent_tokens = 0
        self.sent_text = ""

    def delta(self, seq: Sequence, finished: bool) -> Delta | None:
        text = seq.text.ready(finished)
        new_tokens = seq.output[self.sent_tokens :]
        if not new_tokens and not finished and text == self.sent_text:
            return None
        delta = Delta(
            seq.id,
            new_tokens,
            text[len(self.sent_text) :],
            seq.finish_reason if finished else None,
            seq.stats.as_dict(),
            seq.error if finished else None,
        )
        self.sent_tokens, self.sent_text = len(seq.output), text
        return delta


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _generator_state(seq: Sequence) -> torch.Tensor | None:
    """A sampling sequence's random state, so that a retried step draws the same numbers."""
    return None if seq.generator is None else seq.generator.get_state()


def _restore_generator(seq: Sequence, state: torch.Tensor | None) -> None:
    if state is not None:
        seq.generator.set_state(state)


def _notify(request: Request, seq: Sequence, finished: bool) -> None:
    """Tell a request's owner; a failing callback never takes the engine down."""
    if request.on_update is not None:
        try:
            request.on_update(seq, finished)
        except Exception:
            log.exception("update callback of request %s failed", request.request_id)


def _all_done(seqs: list[Sequence], expected: int, done: threading.Event) -> None:
    if len(seqs) == expected and all(s.finished for s in seqs):
        done.set()
