"""`selfspec train-draft`: fit an exit adapter (`exit_adapter`) for one exit layer by
self-distillation, on this machine, from the model's own teacher-forced passes.

The data is text already here: the model's own answers to a set of instructions (the
text the draft will meet when serving), then this project's documentation and source
files, cut into pieces. Teacher-forced passes over them give, at every position, the hidden state
after the exit layer and the full model's next-token distribution, of which the top
`TOP` probabilities are kept. The adapter is then trained to give, through the model's
own final norm and LM head, the full model's distribution (cross-entropy against it),
with AdamW in float32. Everything random is drawn from the seed, so a run is repeated
exactly on the same machine. A tenth of the answers and a tenth of the other text, drawn
by the seed, are held out: the agreement reported, before and after, is there, over all
of it and over the answers alone, which say more of serving (source code is easier).
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.common.params import SamplingParams
from services.engine import exit_adapter
from services.engine.exit_adapter import ExitAdapter
from services.engine.layers import normalize

TOP = 32  # teacher probabilities kept per position
PIECE = 256  # tokens per piece of text
ANSWER_TOKENS = 160  # of each instruction's answer (`selfspec train-draft --answer-tokens`)
TEXT_TOKENS = 24_000  # of documentation and source files (`--text-tokens`)
PASS_ROWS = 1024  # tokens per teacher-forced pass: its logits take 4 * vocab bytes each
HELD_OUT = 0.1  # the share of pieces kept for the agreement reported
ROOT = Path(__file__).resolve().parents[2]
# Instructions the model answers for its training text; none is a benchmark prompt.
INSTRUCTIONS = [
    "Explain how a hash table handles collisions.",
    "Write a short story about a robot who learns to paint.",
    "List five tips for writing clear emails.",
    "What causes the seasons on Earth?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarise the main ideas of supply and demand.",
    "Describe a healthy breakfast and why it is healthy.",
    "How do vaccines train the immune system?",
    "Write a SQL query that counts orders per customer.",
    "Give three reasons to learn a second language.",
    "Explain recursion to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "Write a JavaScript function that debounces another function.",
    "Describe the water cycle step by step.",
    "How should a beginner start running?",
    "Explain what an API is, with an example.",
    "Write a polite reply declining a meeting invitation.",
    "What are the planets of the solar system, in order?",
    "Write a bash command that finds the largest files in a folder.",
    "Explain the difference between a process and a thread.",
    "Plan a simple three-day trip to a city by the sea.",
    "Why is sleep important for learning?",
    "Write a Python class for a bank account with deposit and withdraw.",
]
SOURCES = ("README.md", "services/**/*.py", "benchmarks/*.py")


@dataclass
class Data:
    """Per position: the hidden state after the exit layer, the full model's top ids and
    their probabilities; `pieces` marks where each piece's positions begin."""

    hidden: torch.Tensor  # [N, hidden] float32
    top_ids: torch.Tensor  # [N, TOP]
    top_p: torch.Tensor  # [N, TOP] float32
    pieces: list[int]

    def split(self, piece: int) -> tuple[Data, Data]:
        """The positions of the pieces before `piece`, and those from it on."""
        cut = self.pieces[piece]
        head = Data(self.hidden[:cut], self.top_ids[:cut], self.top_p[:cut], self.pieces[:piece])
        tail = [p - cut for p in self.pieces[piece:]]
        return head, Data(self.hidden[cut:], self.top_ids[cut:], self.top_p[cut:], tail)


class Progress:
    """One line on stderr, rewritten in place: `what done/total (elapsed) extra`."""

    def __init__(self, what: str, total: int, quiet: bool = False) -> None:
        self.what, self.total, self.quiet = what, total, quiet
        self.t0 = time.perf_counter()

    def __call__(self, done: int, extra: str = "") -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        line = f"\r{self.what} {done}/{self.total} ({elapsed:.0f} s) {extra}"
        print(line, end="\n" if done >= self.total else "", file=sys.stderr, flush=True)


def texts(engine, answer_tokens: int, file_tokens: int, quiet: bool = False) -> list[list[int]]:
    """Token pieces of local text: each instruction with the model's greedy answer (chat
    template, all answered together), then documentation and source files, cut into
    pieces, up to `file_tokens` tokens of them."""
    params = SamplingParams(max_tokens=answer_tokens)
    prompts = [engine.encode(text, chat=True) for text in INSTRUCTIONS]
    if not quiet:
        print(f"train-draft: answering {len(prompts)} instructions", file=sys.stderr, flush=True)
    answers = engine.generate(prompts, params, "off")
    pieces = [(p + a.token_ids)[:PIECE] for p, a in zip(prompts, answers, strict=True)]
    paths = sorted({p for pattern in SOURCES for p in ROOT.glob(pattern) if p.is_file()})
    budget = file_tokens
    for path in paths:
        ids = engine.tokenizer.encode(path.read_text(errors="replace"), add_special_tokens=False)
        ids = ids[:budget]
        pieces += [ids[i : i + PIECE] for i in range(0, len(ids), PIECE) if len(ids) - i > 8]
        budget -= len(ids)
        if budget <= 0:
            break
    return pieces


def gather(engine, layer: int, pieces: list[list[int]], quiet: bool = False) -> Data:
    """Teacher-forced passes over the pieces, `PASS_ROWS` rows a pass, through
    `ModelRunner.forced_states`."""
    hidden, ids, probs = [], [], []
    progress = Progress("train-draft: teacher-forced passes", len(pieces), quiet)
    done = 0
    for group in _groups(pieces, PASS_ROWS):
        below, logits = engine.runner.forced_states(group, layer)
        top = torch.softmax(logits.float(), -1).topk(TOP, -1)
        hidden.append(below.float())
        ids.append(top.indices)
        probs.append(top.values)
        done += len(group)
        progress(done)
    starts = list(itertools.accumulate((len(p) for p in pieces[:-1]), initial=0))
    return Data(torch.cat(hidden), torch.cat(ids), torch.cat(probs), starts)


def _groups(pieces: list[list[int]], rows: int):
    """The pieces in order, in groups of at most `rows` tokens (a longer piece alone)."""
    group, size = [], 0
    for piece in pieces:
        if group and size + len(piece) > rows:
            yield group
            group, size = [], 0
        group.append(piece)
        size += len(piece)
    if group:
        yield group


class Head:
    """The model's final norm and LM head as one float32 matrix, differentiable: what the
    engine's head computes (`Model.logits`), up to rounding."""

    def __init__(self, model) -> None:
        rows = model.head_rows(torch.arange(model.vocab_size, device=model.device)).float()
        gain = model.final.gain
        self.weight = rows if gain is None else rows * gain.float()
        self.n_eps = model.final.n_eps

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(normalize(h, self.n_eps), self.weight)


def agreement(
    head: Head, adapter: ExitAdapter, data: Data, rows: int | None = None, batch: int = 512
) -> float:
    """How often the exit's top token is the full model's (in the first `rows` rows)."""
    n = len(data.hidden) if rows is None else rows
    same = 0
    with torch.no_grad():
        for i in range(0, n, batch):
            j = min(n, i + batch)
            logits = head(adapter(data.hidden[i:j]))
            same += int((logits.argmax(-1) == data.top_ids[i:j, 0]).sum())
    return same / max(1, n)


def held_out(count: int, answers: int, seed: int) -> tuple[list[int], list[int], int]:
    """Indices of `count` pieces, the first `answers` of them the model's answers, to train
    on and to hold out: a tenth of the answers and a tenth of the rest, drawn from `seed`;
    and how many held-out pieces (the first) are answers."""
    rng = random.Random(seed)
    train, held = [], []
    for group in (list(range(answers)), list(range(answers, count))):
        rng.shuffle(group)
        cut = min(len(group) - 1, max(1, round(len(group) * (1 - HELD_OUT))))
        cut = cut if len(group) > 1 else len(group)  # one piece alone is trained on
        train += group[:cut]
        held += group[cut:]
    return train, held, sum(i < answers for i in held)


def fit(
    head: Head,
    start: ExitAdapter,
    data: Data,
    steps: int,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    quiet: bool = False,
) -> ExitAdapter:
    """`start` trained for `steps` steps of `batch` positions drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    params = [start.gain.clone(), start.down.clone(), start.up.clone()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    progress = Progress("train-draft: training", steps, quiet)
    for step in range(steps):
        idx = torch.randint(len(data.hidden), (batch,), generator=g)
        adapter = ExitAdapter(start.layer, start.model_key, *params)
        logp = torch.log_softmax(head(adapter(data.hidden[idx])), -1)
        loss = -(data.top_p[idx] * logp.gather(1, data.top_ids[idx])).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 10 == 9 or step == steps - 1:
            progress(step + 1, f"loss {loss.item():.3f}")
    done = [p.detach() for p in params]
    return ExitAdapter(start.layer, start.model_key, *done)


def train(
    engine,
    model_key: str,
    layer: int,
    *,
    width: int | None = None,
    steps: int = 400,
    seed: int = 0,
    answer_tokens: int = ANSWER_TOKENS,
    file_tokens: int = TEXT_TOKENS,
    pieces: list[list[int]] | None = None,
    quiet: bool = False,
) -> ExitAdapter:
    """An adapter for an exit after `layer` layers of `engine`'s model, trained on
    `pieces` of token ids (default: local text, `texts`), with its training facts
    (`ExitAdapter.facts`)."""
    model = engine.model
    if not 1 <= layer < model.num_layers:
        raise ValueError(f"the exit layer must be between 1 and {model.num_layers - 1}")
    t0 = time.perf_counter()
    answers = 0 if pieces else len(INSTRUCTIONS)  # `texts` gives the answers first
    pieces = list(pieces or texts(engine, answer_tokens, file_tokens, quiet))
    if len(pieces) < 2:
        raise ValueError("training needs at least two pieces of text: one is held out")
    train_ids, held_ids, held_answers = held_out(len(pieces), answers, seed)
    pieces = [pieces[i] for i in train_ids + held_ids]
    train_set, held = gather(engine, layer, pieces, quiet).split(len(train_ids))
    t_data = time.perf_counter() - t0
    head = Head(model)
    hidden = model.config.hidden_size
    start = exit_adapter.initial(layer, model_key, hidden, width or 2 * hidden, seed)
    before = agreement(head, start, held)
    adapter = fit(head, start, train_set, steps, seed=seed, quiet=quiet)
    # The answers are the text a draft meets when serving; the source files are easier.
    rows = held.pieces[held_answers] if held_answers < len(held.pieces) else len(held.hidden)
    on_answers = {
        "answer_positions": rows,
        "agreement_answers_untrained": round(agreement(head, start, held, rows), 4),
        "agreement_answers": round(agreement(head, adapter, held, rows), 4),
    }
    facts = {
        "seed": seed,
        "steps": steps,
        "positions": len(train_set.hidden),
        "held_out_positions": len(held.hidden),
        "pieces": len(pieces),
        "data_s": round(t_data, 1),
        "train_s": round(time.perf_counter() - t0 - t_data, 1),
        "agreement_untrained": round(before, 4),
        "agreement": round(agreement(head, adapter, held), 4),
        **(on_answers if held_answers else {}),
        "weights": str(model.backend),
    }
    return ExitAdapter(layer, model_key, adapter.gain, adapter.down, adapter.up, facts)
