"""The engine's public face: load a model, generate with or without drafting.

A step (`step_once`) is schedule, run, postprocess, as in nano-vllm: the scheduler
plans it (scheduler.py), the engine runs the prefill chunk and the decode groups on
the model and tells each request's owner what changed (outputs.py). A failure while
serving one request ends that request alone.

A request for `n` choices prefills its prompt once: its other choices fork from the
first when that is done (`_fork`), sharing the prompt's KV blocks, and each samples its
own first token from the same logits.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from services.common.params import DraftConfig, SamplingParams
from services.engine import checkpoint, exit_adapter, logprobs, prompts
from services.engine.detokenizer import OutputText
from services.engine.drafting import draft_model as draft_models
from services.engine.drafting.step import Speculator, first_token
from services.engine.exit_adapter import ExitAdapter
from services.engine.kv_pool import BlockTable, KVPool, OutOfBlocks
from services.engine.model import Model
from services.engine.outputs import Completion, completion, notify
from services.engine.profile import load_profile
from services.engine.runner import ModelRunner
from services.engine.scheduler import Request, Scheduler
from services.engine.sequence import Sequence
from services.engine.serving import Loop, Serving

log = logging.getLogger(__name__)


class Engine(Serving):
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
        draft_model: tuple[Model, object] | None = None,
    ) -> None:
        """`allow_draft_override`: whether requests through `submit` (servers) may carry
        their own drafting; `max_draft_configs`: distinct drafting configs run in one step,
        each a pass of its own (requests beyond run with the default, and say so).
        `draft_model`: (model, tokenizer) of a draft model for mode `model`, which is then
        the default's mode; its KV pool takes a share of `kv_cache_bytes`
        (`drafting.draft_model.budgets`). Raises ValueError for a draft model that cannot
        serve `model`, saying why."""
        if max_draft_configs < 1:
            raise ValueError(f"max_draft_configs must be at least 1, got {max_draft_configs}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.max_draft_configs = max_draft_configs
        self.prefill_chunk = prefill_chunk
        self.allow_draft_override = allow_draft_override
        drafter, self.draft_pool = None, None
        if draft_model is not None:
            drafter_model, drafter_tokenizer = draft_model
            retok = draft_models.check_pair(model, tokenizer, drafter_model, drafter_tokenizer)
            kv_cache_bytes, draft_bytes = draft_models.budgets(kv_cache_bytes, model, drafter_model)
            self.draft_pool = _pool(draft_bytes, drafter_model, block_size)
            drafter = draft_models.DraftModel(drafter_model, self.draft_pool, prefill_chunk, retok)
        self.pool = _pool(kv_cache_bytes, model, block_size)
        self.runner = ModelRunner(model, self.pool, drafter)
        # The model's trained exit, if it has one; one trained on another model is refused.
        # (The key of a checkpoint hashes its files, once: only where there is an exit.)
        trained_exit = model_path / exit_adapter.FILE
        if trained_exit.is_file():
            key = checkpoint.model_key(model_path)
            self.runner.layer_drafter.exit = ExitAdapter.load(trained_exit, key, model.device)
        self.drafting = Speculator(self.runner, model.max_positions)
        if drafter is not None:
            self.drafting.policy.model_cost = draft_models.relative_reads(drafter.model, model)
        if draft is None:
            draft, self.auto_layer_draft = load_profile(model_path, model.num_layers)
            if drafter is not None:
                draft = replace(draft, mode="model")
        self.default_draft = draft
        self._check_draft_model(draft)
        self.default_draft.check_layers(model.num_layers)
        self.eos_ids = checkpoint.eos_ids(model.config, tokenizer)
        self._ids = itertools.count()
        self.scheduler = Scheduler(
            self.pool, max_waiting=max_waiting, max_positions=model.max_positions
        )
        self._step_lock = threading.Lock()
        self._loop = Loop(self.step_once, lambda: self.scheduler.has_work, self._fail_all)
        # Requests that failed in a row, with none completing between: for health checks.
        self.consecutive_failures = 0
        self.finished: Counter[str] = Counter()  # requests ended, by finish reason

    @classmethod
    def from_pretrained(
        cls,
        model: str = "default",
        *,
        dtype: str | None = None,
        device: str = "cpu",
        backend: str | None = None,
        weights: str = "auto",
        draft_model: str | None = None,
        **kwargs,
    ) -> Engine:
        """Load `model`: `default`, a Hugging Face checkpoint folder, or a GGUF file.
        `backend`: the compute path (`selfspec_kernels.backend`; default: `SELFSPEC_BACKEND`,
        else the fastest this machine runs). `weights`: `gguf` (a GGUF's matrices in their
        block formats, on the `cpu` backend), `bf16`, `fp16` or `fp32` (dense), or `auto`:
        `dtype` when given, else `gguf` where it runs, else `bf16` (`checkpoint.weights_for`).
        `draft_model`: a second model, loaded the same way (a checkpoint folder beside a
        GGUF target: as `auto` loads it), to draft with (mode `model`)."""
        loaded, tokenizer, path = checkpoint.load(model, dtype, device, backend, weights)
        if draft_model is not None:
            own = weights
            if weights == "gguf" and not checkpoint.is_gguf(draft_model):
                own = "auto"
            drafter, draft_tokenizer, _ = checkpoint.load(draft_model, dtype, device, backend, own)
            kwargs["draft_model"] = (drafter, draft_tokenizer)
        return cls(loaded, tokenizer, path, **kwargs)

    # -- requests ---------------------------------------------------------------

    def encode(
        self,
        prompt: str | list[int] | list[dict],
        chat: bool = False,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Token ids of a prompt (see `prompts.encode`): exactly what the model is fed."""
        return prompts.encode(
            self.tokenizer,
            prompt,
            self.model.vocab_size,
            chat,
            add_generation_prompt,
            continue_final_message,
        )

    def draft_config(self, draft: DraftConfig | str | dict | None) -> DraftConfig:
        """A request's drafting: its override over the model's default, with the layers a
        mode named alone needs; raises ValueError for layers the model lacks."""
        trained = self.runner.layer_drafter.exit
        trained = trained.layer if trained else None
        cfg = DraftConfig.parse(draft, self.default_draft).filled(self.model.num_layers, trained)
        cfg.check_layers(self.model.num_layers)
        self._check_draft_model(cfg)
        return cfg

    def _check_draft_model(self, cfg: DraftConfig) -> None:
        if cfg.mode == "model" and self.runner.draft_model is None:
            raise ValueError(
                "draft.mode 'model': this engine has no draft model: start it with --draft-model"
            )

    def add_request(self, prompt, params=None, draft=None, **options) -> Sequence:
        """Validate and queue one request (see `add_choices`); returns its first choice."""
        return self.add_choices(prompt, params, draft, **options)[0]

    def add_choices(
        self,
        prompt: str | list[int] | list[dict],
        params: SamplingParams | None = None,
        draft: DraftConfig | str | dict | None = None,
        *,
        chat: bool = False,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        request_id: str | None = None,
        session_id: str | None = None,
        on_update: Callable[[Sequence, bool], None] | None = None,
    ) -> list[Sequence]:
        """Validate and queue one request; returns the sequences of its `params.n` choices.
        `on_update(seq, finished)` runs on the engine's thread after every step that changes
        a choice (`seq.index`). Choice i > 0 has the id "{request_id}/{i}", and no session,
        which the first alone keeps. The chat options apply to messages
        (`prompts.apply_chat_template`). Raises ValueError or QueueFull."""
        params = params or SamplingParams()
        cfg = self.draft_config(draft)
        ids = self.encode(prompt, chat, add_generation_prompt, continue_final_message)
        prompts.check_fits(ids, params, self.model.max_positions)
        request_id = request_id or f"req-{next(self._ids)}"
        choices = []
        for i in range(params.n):
            choice_id, session = (request_id, session_id) if i == 0 else (f"{request_id}/{i}", None)
            request = Request(choice_id, ids, params, cfg, session, on_update)
            text = OutputText(self.tokenizer, params.stop)
            seq = Sequence(choice_id, ids, params, BlockTable(self.pool), text=text, index=i)
            seq.need = min(
                len(ids) + params.max_tokens + cfg.max_draft + 1, self.model.max_positions
            )
            choices.append((request, seq))
        self.scheduler.add(*choices[0], choices[1:])
        self._loop.wake()
        return [seq for _, seq in choices]

    def generate(
        self,
        prompts: list[str | list[int]] | str,
        params: SamplingParams | None = None,
        draft: DraftConfig | str | dict | None = None,
        *,
        chat: bool = False,
        session_id: str | None = None,
    ) -> list[Completion]:
        """`params.n` completions per prompt, prompt by prompt, in choice order; prompts are
        batched together as the pool allows."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        done = threading.Event()
        seqs: list[Sequence] = []
        total = len(prompts) * (params.n if params else 1)

        def all_done(_seq: Sequence | None = None, finished: bool = True) -> None:
            # Checked again after the last is added: all may have finished by then.
            if finished and len(seqs) == total and all(s.finished for s in seqs):
                done.set()

        try:
            for p in prompts:
                seqs += self.add_choices(
                    p, params, draft, chat=chat, session_id=session_id, on_update=all_done
                )
        except Exception:
            for seq in seqs:
                self.abort(seq.id)
            if not self._loop.started:
                while self.scheduler.has_work:
                    self.step_once()
            raise
        all_done()
        if not self._loop.started:
            while not done.is_set():
                self.step_once()
        else:
            done.wait()
        return [completion(s) for s in seqs]

    def abort(self, request_id: str) -> bool:
        """Cancel a request; it ends, and its blocks are freed, at the next step boundary.
        Returns False when no request with this id is queued or running."""
        found = self.scheduler.abort(request_id)
        self._loop.wake()
        return found

    def stats(self) -> dict:
        """A snapshot of the engine's load and KV cache, for health checks and metrics."""
        return {**self.scheduler.stats(), "finished": dict(self.finished)}

    # -- the loop: schedule, run, postprocess -----------------------------------------

    def step_once(self) -> None:
        """One iteration: drop cancelled requests, admit, prefill a chunk, decode a step."""
        with self._step_lock:
            plan = self.scheduler.schedule()
            for request, seq in plan.aborted:
                self._done(request, seq)
            for request, seq, exc in plan.failed:
                self._fail(request, seq, exc)
            if plan.prefill is not None:
                self._prefill(*plan.prefill)
            self._decode()

    def _prefill(self, request: Request, seq: Sequence) -> None:
        """A chunk of the prompt; with the last, the first token (known already when the
        sequence resumes after a preemption), and the sequence runs."""
        resumed = bool(seq.output)
        try:
            logits = self.runner.prefill(seq, self.prefill_chunk)
            if logits is not None and not resumed:
                added = seq.append([self._first_token(seq, logits[-1])], self.eos_ids)
                logprobs.record(seq, logits[-1:], added)
                self._fork(request, seq, logits[-1:])
        except Exception as exc:
            self._fail(request, seq, exc)
            return
        if logits is None:  # more chunks to come
            return
        if seq.finished:
            self._done(request, seq)
            return
        self.scheduler.start_running(request, seq)
        if not resumed:
            notify(request, seq, False)

    def _fork(self, request: Request, seq: Sequence, logits) -> None:
        """The request's other choices, forked from its first just prefilled: each shares
        the prompt's full KV blocks, samples its own first token from the same `logits`
        (`[1, vocab]`), and runs, or ends at once."""
        for choice_request, choice in self.scheduler.take_unforked(request.request_id):
            try:
                choice.table = seq.table.fork()
                added = choice.append([self._first_token(choice, logits[-1])], self.eos_ids)
                logprobs.record(choice, logits, added)
            except OutOfBlocks:  # no block for its copy: it prefills itself, unshared
                self.scheduler.requeue(choice_request, choice)
                continue
            except Exception as exc:  # this choice alone
                self._fail(choice_request, choice, exc)
                continue
            if choice.finished:
                self._done(choice_request, choice)
                continue
            self.scheduler.join(choice_request, choice)
            notify(choice_request, choice, False)

    def _decode(self) -> None:
        """A draft-and-verify step for every running sequence, a pass per drafting group."""
        groups = self.scheduler.schedule_decode(
            self.default_draft, self._bucket_drafts, self.max_draft_configs
        )
        for cfg, seqs in groups.items():
            self._step_group(seqs, cfg)
        for request, seq in self.scheduler.postprocess():
            self._done(request, seq)
        for request, seq in self.scheduler.running:
            notify(request, seq, False)

    def _step_group(self, seqs: list[Sequence], cfg: DraftConfig) -> None:
        """`step` for one group; when its batched pass fails, again a sequence at a time
        (from the same random state), so that only a sequence that fails alone fails."""
        states = [None if s.generator is None else s.generator.get_state() for s in seqs]
        try:
            self.step(seqs, cfg)
        except Exception as exc:
            if len(seqs) == 1:
                log.exception("request %s failed", seqs[0].id)
                seqs[0].finish("error", _describe(exc))
                return
            log.warning("a step of %d sequences failed; retrying one at a time", len(seqs))
            for seq, state in zip(seqs, states, strict=True):
                if state is not None:
                    seq.generator.set_state(state)
                self._step_group([seq], cfg)

    def _fail(self, request: Request, seq: Sequence, exc: Exception) -> None:
        """End one request for a failure while serving it; its blocks and id are freed."""
        log.error("request %s failed: %s", request.request_id, _describe(exc), exc_info=exc)
        seq.finish("error", _describe(exc))
        self._done(request, seq)

    def _done(self, request: Request, seq: Sequence) -> None:
        """Count a request that ended, release it, then tell its owner."""
        # A run of failures with no success between is a broken engine, not one bad request.
        if seq.finish_reason == "error":
            self.consecutive_failures += 1
        elif seq.finish_reason != "abort":
            self.consecutive_failures = 0
        self.finished[seq.finish_reason] += 1
        self.scheduler.finish(request, seq)
        notify(request, seq, True)
        # Choices not forked yet end as their first did (it failed or was cancelled).
        for choice_request, choice in self.scheduler.take_unforked(request.request_id):
            choice.finish(seq.finish_reason, seq.error)
            self._done(choice_request, choice)

    def step(self, seqs: list[Sequence], cfg: DraftConfig) -> None:
        """Draft for every sequence, verify all drafts in one pass, accept what agrees
        (`drafting.step`). Raises when a batched pass fails, before any sequence changed;
        a failure while accepting for one sequence fails that sequence only."""
        for seq, exc in self.drafting.step(seqs, cfg, self.eos_ids):
            seq.finish("error", _describe(exc))

    _first_token = staticmethod(first_token)


def _pool(budget: int, model: Model, block_size: int) -> KVPool:
    """A KV pool for `model` in `budget` bytes."""
    return KVPool.from_budget(
        budget,
        num_layers=model.num_layers,
        kv_dim=model.kv_dim,
        block_size=block_size,
        dtype=model.kv_dtype,
        device=model.device,
    )


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
