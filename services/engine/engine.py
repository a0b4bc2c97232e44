"""The engine's public face: load a model, generate with or without drafting."""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine import checkpoint
from services.engine.kv_pool import BlockTable, KVPool
from services.engine.model import Model
from services.engine.params import DraftConfig, SamplingParams
from services.engine.runner import ModelRunner
from services.engine.sampler import accept_greedy, accept_sampled, probabilities, sample
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
        draft: DraftConfig | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.prefill_chunk = prefill_chunk
        self.pool = KVPool.from_budget(
            kv_cache_bytes,
            num_layers=model.num_layers,
            kv_dim=model.kv_dim,
            block_size=block_size,
            dtype=model.dtype,
            device=model.device,
        )
        self.runner = ModelRunner(model, self.pool)
        self.default_draft = draft or self._load_profile()
        self.default_draft.check_layers(model.num_layers)
        eos = model.config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(e for e in eos if e is not None)
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(
        cls,
        model: str = "default",
        *,
        dtype: str = "bfloat16",
        device: str = "cpu",
        **kwargs,
    ) -> Engine:
        """Load `model`: `default`, a Hugging Face checkpoint folder, or a GGUF file."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        path = checkpoint.resolve(model)
        config = checkpoint.load_config(path)
        weights = Model(config, checkpoint.load_tensors(path), DTYPES[dtype], device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        log.info("loaded %s in %.2f s", path, time.perf_counter() - t0)
        return cls(weights, tokenizer, path, **kwargs)

    def _load_profile(self) -> DraftConfig:
        path = profile_path(self.model_path)
        if path.is_file():
            return DraftConfig(**json.loads(path.read_text())["draft"])
        # No tuned profile: skip the MLP of every other layer in the upper half.
        n = self.model.num_layers
        return DraftConfig(mode="skip", skip_mlp=tuple(range(n // 2, n, 2)))

    # -- requests ---------------------------------------------------------------

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if chat:
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = self.tokenizer.encode(prompt, add_special_tokens=False)
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

    def generate(
        self,
        prompts: list[str | list[int]] | str,
        params: SamplingParams | None = None,
        draft: DraftConfig | str | dict | None = None,
        *,
        chat: bool = False,
    ) -> list[Completion]:
        """One completion per prompt, all decoded together as one batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        params = params or SamplingParams()
        cfg = DraftConfig.parse(draft, self.default_draft)
        cfg.check_layers(self.model.num_layers)
        encoded = [self.encode(p, chat) for p in prompts]
        for ids in encoded:
            self._check_fits(ids, params)
        need = sum(
            self.pool.blocks_for(len(p) + params.max_tokens + cfg.max_draft + 1) for p in encoded
        )
        if need > self.pool.num_free:
            raise ValueError(
                f"these prompts need {need} KV blocks and the pool has {self.pool.num_free} free; "
                "send fewer or shorter prompts, or give the engine a larger kv_cache_bytes"
            )
        seqs = [
            Sequence(f"gen-{next(self._ids)}", ids, params, BlockTable(self.pool))
            for ids in encoded
        ]
        try:
            for seq in seqs:
                logits = self.runner.prefill(seq, self.prefill_chunk)
                seq.append([self._first_token(seq, logits[-1])], self.eos_ids)
            running = [s for s in seqs if not s.finished]
            while running:
                self.step(running, cfg)
                running = [s for s in running if not s.finished]
        finally:
            for seq in seqs:
                seq.table.free()
        return [self._completion(s) for s in seqs]

    def step(self, seqs: list[Sequence], cfg: DraftConfig) -> None:
        """Draft for every sequence, verify all drafts in one pass, accept what agrees."""
        room = [
            min(cfg.max_draft, s.remaining - 1, self.model.max_positions - s.num_tokens)
            for s in seqs
        ]
        for s, r in zip(seqs, room, strict=True):
            s.table.reserve(s.num_tokens + max(r, 0))
        drafts = self.runner.draft(seqs, cfg, [max(r, 0) for r in room])
        logits = self.runner.verify(seqs, drafts)
        for i, seq in enumerate(seqs):
            proposed = drafts.tokens[i]
            if seq.params.greedy:
                n, nxt = accept_greedy(proposed, logits[i])
            else:
                q = drafts.probs[i] if drafts.probs is not None else None
                p = probabilities(logits[i], seq.params)
                n, nxt = accept_sampled(proposed, q, p, seq.generator)
            seq.table.commit(seq.table.num_tokens + n + 1)
            seq.stats.record(len(proposed), n)
            seq.append(proposed[:n] + [nxt], self.eos_ids)

    @staticmethod
    def _first_token(seq: Sequence, logits: torch.Tensor) -> int:
        if seq.params.greedy:
            return int(logits.argmax())
        return sample(probabilities(logits, seq.params), seq.generator)

    def _completion(self, seq: Sequence) -> Completion:
        return Completion(
            token_ids=list(seq.output),
            text=self.tokenizer.decode(seq.output, skip_special_tokens=True),
            finish_reason=seq.finish_reason or "length",
            stats=seq.stats.as_dict(),
        )
