"""What a caller asks for: how to sample, and how to draft. Validated on creation.

Every field is checked for its type as well as its range: a config from outside (a
request, a fleet record) that passed with `max_draft=4.5` would fail every engine step
that used it, far from where it came in. Errors are ValueErrors naming the field.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, replace

# -- request limits ---------------------------------------------------------------------
# What one request may ask for. They bound the work and memory a request can claim before
# the engine sees it (the engine further checks max_tokens against the model's context);
# the gateway and replicas answer INVALID_ARGUMENT past them.
MAX_TOKENS_LIMIT = 1 << 16  # max_tokens
MAX_TEMPERATURE = 100.0  # beyond this sampling is uniform noise in all but name
MAX_TOP_K = 1 << 20  # above any vocabulary served; 0 means no limit
SEED_LIMIT = 1 << 63  # seeds are in [0, 2**63): a signed 64-bit integer everywhere
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per output token, as OpenAI's top_logprobs
# Temperatures below this sample greedily, as vLLM does (its _SAMPLING_EPS): dividing the
# logits by a tinier temperature overflows to inf, and the softmax of inf is nan.
GREEDY_BELOW = 1e-5

# -- drafting limits --------------------------------------------------------------------
DRAFT_MODES = ("off", "skip", "early_exit", "ngram", "model", "auto")
MAX_DRAFT_TOKENS = 16
MAX_SKIP_LAYERS = 1024  # entries per skip list; layer numbers are checked against the model
MAX_SHORTLIST = 1 << 20  # draft-head ids; at or above the vocabulary means the full head
MAX_NGRAM = 16

# Values in error messages are shown shortened: a request may send megabytes.
_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 60


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    """`value` is an int (a bool is not) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_shown.repr(value)}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bounds}, got {_shown.repr(value)}")


def _finite(name: str, value) -> float:
    """`value` as a float, if it is a finite int or float (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {_shown.repr(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too big for a float
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {_shown.repr(value)}")
    return number


def _int_list(name: str, value, limit: int, what: str) -> tuple[int, ...]:
    """A list or tuple of at most `limit` ints (not bools)."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list of {what}, got {_shown.repr(value)}")
    if len(value) > limit:
        raise ValueError(f"{name} has {len(value)} entries; the limit is {limit}")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ValueError(f"{name} must be a list of {what}, got {_shown.repr(bad[0])} in it")
    return tuple(value)


def _stop_strings(value) -> tuple[str, ...]:
    """The stop strings: a list or tuple of them, or one string alone (as in vLLM)."""
    stop = (value,) if isinstance(value, str) else value
    if not isinstance(stop, list | tuple):
        raise ValueError(f"stop must be a list of strings, got {_shown.repr(value)}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for s in stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValueError(
                f"stop takes strings of 1 to {MAX_STOP_CHARS} characters, got {_shown.repr(s)}"
            )
    return tuple(stop)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, named as in vLLM; the limits above bound them.

    `n` choices are sampled from one prompt; with a `seed`, choice i samples from
    seed + i (modulo SEED_LIMIT), so a seeded request repeats choice for choice.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # each output token's logprob, and this many alternatives
    min_p: float = 0.0  # drop tokens under min_p times the most likely one's probability

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        ids = _int_list("stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS, "token ids")
        if any(i < 0 for i in ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {_shown.repr(ids)}")
        object.__setattr__(self, "stop_token_ids", ids)
        _check_int("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT)
        self._check_distribution()
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(
                f"ignore_eos must be true or false, got {_shown.repr(self.ignore_eos)}"
            )
        _check_int("n", self.n, 1, MAX_N)
        if self.n > 1 and self.greedy:
            raise ValueError("n > 1 needs temperature > 0: greedy choices would all be the same")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)

    def _check_distribution(self) -> None:
        """Temperature, top-p, top-k and min-p; the numbers are kept as floats."""
        temperature = _finite("temperature", self.temperature)
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}"
            )
        top_p = _finite("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        _check_int("top_k", self.top_k, 0, MAX_TOP_K)  # 0: no limit
        min_p = _finite("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be between 0 and 1, got {min_p}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "min_p", min_p)

    @property
    def greedy(self) -> bool:
        """Whether to take the argmax; temperatures under GREEDY_BELOW count as 0."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class DraftConfig:
    """How to draft tokens for verification.

    `skip`: run the model without the attention sublayers in `skip_attn` and the MLP
    sublayers in `skip_mlp`. `early_exit`: run the first `exit_layer` layers, then
    the LM head. `ngram`: copy what followed the latest match of the recent tokens.
    `model`: the engine's draft model, a smaller model with its own tokenizer or the
    target's.
    Drafting stops before `max_draft` tokens once the draft's top probability falls
    under `threshold`. `shortlist` > 0 gives the draft an LM head over token ids
    below it plus the ids already in the context.

    Every field must have its exact type (an int field takes no float or bool, even
    4.0); layer numbers are checked against a model by `check_layers`.
    """

    mode: str = "skip"
    skip_attn: tuple[int, ...] = ()
    skip_mlp: tuple[int, ...] = ()
    exit_layer: int | None = None
    max_draft: int = 4
    threshold: float = 0.0
    shortlist: int = 0
    ngram_max: int = 4
    ngram_min: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in DRAFT_MODES:
            raise ValueError(
                f"draft mode must be one of {', '.join(DRAFT_MODES)}; got {_shown.repr(self.mode)}"
            )
        for name in ("skip_attn", "skip_mlp"):
            layers = _int_list(name, getattr(self, name), MAX_SKIP_LAYERS, "layer numbers")
            object.__setattr__(self, name, tuple(sorted(set(layers))))
        if self.exit_layer is not None:
            _check_int("exit_layer", self.exit_layer, 1)  # the top bound is the model's
        _check_int("max_draft", self.max_draft, 1, MAX_DRAFT_TOKENS)
        threshold = _finite("threshold", self.threshold)
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        object.__setattr__(self, "threshold", threshold)
        _check_int("shortlist", self.shortlist, 0, MAX_SHORTLIST)
        _check_int("ngram_max", self.ngram_max, 1, MAX_NGRAM)
        _check_int("ngram_min", self.ngram_min, 1, self.ngram_max)

    @property
    def layer_mode(self) -> str | None:
        """The layer draft this config runs, if any: `auto` uses what its fields describe."""
        if self.mode in ("skip", "early_exit"):
            return self.mode
        if self.mode == "auto":
            if self.skip_attn or self.skip_mlp:
                return "skip"
            if self.exit_layer is not None:
                return "early_exit"
        return None

    def filled(self, num_layers: int, exit_layer: int | None = None) -> DraftConfig:
        """This config with the layers its mode needs, where it names none: `exit_layer`
        (the model's trained exit) for `early_exit`, else the untuned defaults. A mode name
        alone works on any model."""
        if self.mode == "skip" and not self.skip_attn and not self.skip_mlp:
            return replace(self, skip_attn=untuned_skip_attn(num_layers))
        if self.mode == "early_exit" and self.exit_layer is None:
            return replace(self, exit_layer=exit_layer or untuned_exit_layer(num_layers))
        return self

    def check_layers(self, num_layers: int) -> None:
        """Refuse layer numbers the model does not have, and skipping everything. The
        layer draft `auto` would run is held to what its mode would be."""
        for name in ("skip_attn", "skip_mlp"):
            bad = [i for i in getattr(self, name) if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"{name} names layers {_shown.repr(bad)}; the model has layers "
                    f"0..{num_layers - 1}"
                )
        if self.mode == "skip" and not self.skip_attn and not self.skip_mlp:
            raise ValueError("mode 'skip' needs at least one layer in skip_attn or skip_mlp")
        if self.layer_mode == "skip" and len(self.skip_attn) == len(self.skip_mlp) == num_layers:
            raise ValueError("a skip set may not skip every sublayer; nothing would be drafted")
        if self.mode == "early_exit" and self.exit_layer is None:
            raise ValueError(f"early_exit needs exit_layer between 1 and {num_layers - 1}")
        # Checked in every mode: `auto` exits there when it names no skip set.
        if self.exit_layer is not None and not 1 <= self.exit_layer < num_layers:
            raise ValueError(
                f"exit_layer must be between 1 and {num_layers - 1}, got {self.exit_layer}"
            )

    @classmethod
    def parse(cls, value: DraftConfig | str | dict | None, default: DraftConfig) -> DraftConfig:
        """A config from a config, a mode name (taking the rest from `default`), or a dict."""
        if value is None:
            return default
        if isinstance(value, DraftConfig):
            return value
        if isinstance(value, str):
            return replace(default, mode=value)
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown draft settings: {', '.join(sorted(map(str, unknown)))}")
            return replace(default, **value)
        raise ValueError(f"draft must be a DraftConfig, a mode name or a dict, not {type(value)}")


def untuned_skip_attn(num_layers: int) -> tuple[int, ...]:
    """A model's skip set before tuning: the attention of every other middle layer."""
    return tuple(range(num_layers // 4, 3 * num_layers // 4, 2))


def untuned_exit_layer(num_layers: int) -> int:
    """A model's early exit before tuning: three quarters of the way up."""
    return num_layers * 3 // 4
