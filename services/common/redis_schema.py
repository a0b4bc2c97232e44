"""The fleet's Redis schema, defined once: keys, streams, channels, config records.

Everything the controller and the engine replicas share in Redis is named here,
under one prefix with a schema version, so two fleets (or two schema versions)
never read each other's data:

    selfspec:v1:lease                       the controller lease: "<controller id>|<nonce>"
    selfspec:v1:version                     INCR counter: every config version, all models
    selfspec:v1:telemetry                   stream of replica telemetry windows
    selfspec:v1:rejections                  stream of records replicas refused, and why
    selfspec:v1:models                      set of model names replicas serve
    selfspec:v1:model:<model>:current       the current config record (JSON)
    selfspec:v1:model:<model>:history       hash: version -> record (JSON)
    selfspec:v1:model:<model>:pin           version an operator pinned; decisions wait
    selfspec:v1:model:<model>:replicas      hash: replica id -> its state (JSON)
    selfspec:v1:model:<model>:candidates    skip sets under trial (JSON), for replicas to score
    selfspec:v1:model:<model>:search        the search's progress (JSON), for status
    selfspec:v1:config                      pub/sub channel: {"model", "version"} per record

A config record is JSON: `version` (monotonic, from the counter), `model`, `draft`
(DraftConfig fields, each of its exact JSON type: `max_draft` 4, never 4.0), `buckets`
(per batch-size bucket overrides of mode, max_draft and threshold), `hash` (sha256 of
the canonical JSON of model, draft and buckets), `evidence`, `reason`, `created_at`
and `by`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from services.common.params import DraftConfig
from services.common.speedup import BUCKETS

SCHEMA = 1
PREFIX = f"selfspec:v{SCHEMA}"
KIND = "selfspec.draft-config"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_ENV = "SELFSPEC_REDIS_URL"
PASSWORD_ENV = "SELFSPEC_REDIS_PASSWORD"
PASSWORD_FILE_ENV = "SELFSPEC_REDIS_PASSWORD_FILE"

LEASE = f"{PREFIX}:lease"
VERSION = f"{PREFIX}:version"
TELEMETRY = f"{PREFIX}:telemetry"
REJECTIONS = f"{PREFIX}:rejections"
MODELS = f"{PREFIX}:models"
CHANNEL = f"{PREFIX}:config"
TELEMETRY_MAXLEN = 20_000  # approximate (MAXLEN ~): trimming stays cheap
REJECTIONS_MAXLEN = 1_000
BUCKET_FIELDS = ("mode", "max_draft", "threshold")  # what a bucket may override


def model_key(model: str, what: str) -> str:
    """`current`, `history`, `pin`, `replicas`, `candidates` or `search` of a model."""
    return f"{PREFIX}:model:{model}:{what}"


# -- connection settings ------------------------------------------------------------


def redis_url(url: str | None = None) -> str:
    """The URL to use: given, else `SELFSPEC_REDIS_URL`, else the local default."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def connect(url: str | None = None, timeout: float = 2.0):
    """A Redis client for `url`, as the user the URL names (`redis://replica@host:6379/0`;
    none: `default`), with the password of `password()`. Timeouts are short: callers
    retry."""
    import redis

    url = redis_url(url)
    override = password()
    if override:
        url = with_credentials(url, password=override)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry_on_timeout=False,
        **_no_client_setinfo(),
    )


def password() -> str | None:
    """The password that replaces the URL's, if any: the content of the file that
    `SELFSPEC_REDIS_PASSWORD_FILE` names (what `selfspec serve` gives its replicas: Ray
    logs their args and env), else `SELFSPEC_REDIS_PASSWORD` (the Helm chart's way)."""
    path = os.environ.get(PASSWORD_FILE_ENV)
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"cannot read the Redis password ({PASSWORD_FILE_ENV}): {exc}"
            ) from None
    return os.environ.get(PASSWORD_ENV) or None


def _no_client_setinfo() -> dict:
    """redis-py's arguments that keep it from sending CLIENT SETINFO on connect: the ACL
    users may not run it (Redis before 7.2 lacks it, so no rule could allow it on every
    Redis), and each refusal would add an entry to ACL LOG, hiding real ones."""
    from redis.connection import AbstractConnection

    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters:
        return {"driver_info": None}
    return {"lib_name": None, "lib_version": None}


def with_credentials(url: str, user: str | None = None, password: str | None = None) -> str:
    """`url` with its user and/or password replaced (redis-py lets a URL's password win
    over a keyword argument, so an override goes into the URL)."""
    parts = urlsplit(url)
    user = user if user is not None else (unquote(parts.username) if parts.username else "")
    if password is None:
        password = unquote(parts.password) if parts.password else ""
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = (f"{auth}@" if auth else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def user_of(url: str | None = None) -> str:
    """The Redis user `url` logs in as."""
    name = urlsplit(redis_url(url)).username
    return unquote(name) if name else "default"


def describe(url: str | None = None) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(redis_url(url))
    user = f"{unquote(parts.username)}@" if parts.username else ""
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def unreachable_hint(url: str | None = None) -> str:
    return (
        f"cannot reach Redis at {describe(url)}: start one (`redis-server --port "
        f"{urlsplit(redis_url(url)).port or 6379}`) or point --redis-url / {URL_ENV} at yours"
    )


def refused_hint(exc: Exception, url: str | None = None) -> str:
    """What to check when Redis refused our user (WRONGPASS, NOAUTH) or one of its
    commands (NOPERM)."""
    import redis

    user, where = user_of(url), describe(url)
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (
            f"Redis at {where} refused user {user!r} a command (NOPERM {exc}): run each role "
            "as its own user, `replica` for engine replicas and `controller` for controllers, "
            "with the rules that `python -m services.common.redis_acl` prints"
        )
    return (
        f"Redis at {where} refused user {user!r} ({exc}): check its password "
        f"({PASSWORD_FILE_ENV}, {PASSWORD_ENV} or the URL's), and that the user exists "
        "there (`python -m services.common.redis_acl` prints the users to create)"
    )


# -- config records -----------------------------------------------------------------


class RecordError(ValueError):
    """A config record that must not be applied; the message says why."""


def content_hash(model: str, draft: dict, buckets: dict) -> str:
    canon = json.dumps(
        {"model": model, "draft": draft, "buckets": buckets}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canon.encode()).hexdigest()


def draft_fields(cfg: DraftConfig) -> dict:
    return {
        "mode": cfg.mode,
        "skip_attn": list(cfg.skip_attn),
        "skip_mlp": list(cfg.skip_mlp),
        "exit_layer": cfg.exit_layer,
        "max_draft": cfg.max_draft,
        "threshold": cfg.threshold,
        "shortlist": cfg.shortlist,
        "ngram_max": cfg.ngram_max,
        "ngram_min": cfg.ngram_min,
    }


@dataclass
class Record:
    """A versioned drafting config for one model."""

    model: str
    draft: dict
    buckets: dict[str, dict] = field(default_factory=dict)
    version: int = 0
    hash: str = ""
    evidence: dict = field(default_factory=dict)
    reason: str = ""
    created_at: float = 0.0
    by: str = ""

    def __post_init__(self) -> None:
        if not self.hash:
            self.hash = content_hash(self.model, self.draft, self.buckets)
        if not self.created_at:
            self.created_at = time.time()

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema": SCHEMA,
                "kind": KIND,
                "version": self.version,
                "model": self.model,
                "draft": self.draft,
                "buckets": self.buckets,
                "hash": self.hash,
                "evidence": self.evidence,
                "reason": self.reason,
                "created_at": self.created_at,
                "by": self.by,
            },
            sort_keys=True,
        )

    def as_dict(self) -> dict:
        return json.loads(self.to_json())

    @classmethod
    def parse(cls, text: str | bytes | None) -> Record:
        """A record from stored JSON; RecordError if it is not one of ours or is damaged."""
        if text is None:
            raise RecordError("no record")
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("kind") != KIND:
            raise RecordError("not a selfspec draft-config record")
        if raw.get("schema") != SCHEMA:
            raise RecordError(f"schema {raw.get('schema')!r}, this build reads {SCHEMA}")
        try:
            rec = cls(
                model=str(raw["model"]),
                draft=dict(raw["draft"]),
                buckets=dict(raw.get("buckets") or {}),
                version=_version(raw["version"]),
                hash=str(raw["hash"]),
                evidence=dict(raw.get("evidence") or {}),
                reason=str(raw.get("reason", "")),
                created_at=float(raw.get("created_at", 0.0)),
                by=str(raw.get("by", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"malformed record: {exc!r}") from None
        if rec.hash != content_hash(rec.model, rec.draft, rec.buckets):
            raise RecordError(f"version {rec.version}: content hash does not match")
        return rec

    def drafts(self, num_layers: int) -> tuple[DraftConfig, dict[int, DraftConfig]]:
        """The base config and per-bucket configs, validated against a model with
        `num_layers` layers; RecordError names what is wrong. Every field must have its
        exact JSON type (`4.0` is no `max_draft`): a replica applies nothing it would
        fail to run."""
        try:
            base = _checked(_draft_args(self.draft), num_layers)
            by_bucket = {
                _bucket_of(key, over): _bucket_config(self.draft, base, key, over, num_layers)
                for key, over in self.buckets.items()
            }
        except (TypeError, ValueError) as exc:
            raise RecordError(f"version {self.version}: {exc}") from None
        return base, by_bucket


def _version(value) -> int:
    """A record's version: an integer, not a string or float that converts to one."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"version must be an integer, got {value!r}")
    return value


def _draft_args(draft: dict) -> dict:
    unknown = set(draft) - set(DraftConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown draft fields {sorted(map(str, unknown))}")
    return dict(draft)


def _checked(args: dict, num_layers: int) -> DraftConfig:
    cfg = DraftConfig(**args)  # types and ranges
    cfg.check_layers(num_layers)
    return cfg


def _bucket_config(draft: dict, base: DraftConfig, key: str, over: dict, num_layers: int):
    """The config a bucket runs: the base draft with the bucket's overrides."""
    try:
        cfg = _checked({**_draft_args(draft), **over}, num_layers)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bucket {key}: {exc}") from None
    # The engine reserved KV for the base length when it admitted a request.
    if cfg.max_draft > base.max_draft:
        raise ValueError(f"bucket {key} drafts more than the base max_draft")
    return cfg


def _bucket_of(key: str, over) -> int:
    """The batch bucket a bucket override's key names; the override may only change
    BUCKET_FIELDS. A key must be the bucket as written (`"4"`, not `" 4"` or `"04"`)."""
    if key not in {str(b) for b in BUCKETS}:
        raise ValueError(f"bucket {key!r} is not one of {BUCKETS}")
    if not isinstance(over, dict):
        raise ValueError(f"bucket {key} must map settings to values, got {type(over).__name__}")
    unknown = set(over) - set(BUCKET_FIELDS)
    if unknown:
        raise ValueError(f"bucket {key} overrides {sorted(unknown)}")
    return int(key)


# -- skip-set candidates ------------------------------------------------------------


def skip_key(skip_attn, skip_mlp) -> str:
    """A skip set's name in telemetry and search state: `a1.2|m5`."""
    return "a" + ".".join(map(str, sorted(skip_attn))) + "|m" + ".".join(map(str, sorted(skip_mlp)))


def parse_skip_key(key: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    a, m = key.split("|")
    return (
        tuple(int(x) for x in a[1:].split(".") if x),
        tuple(int(x) for x in m[1:].split(".") if x),
    )


# An early exit at layer E computes exactly what skipping every sublayer from E up
# computes, so the search names, scores and ranks exits as those skip sets.


def exit_key(exit_layer: int, num_layers: int) -> str:
    """An early exit at `exit_layer`, as the skip set it equals."""
    rest = range(exit_layer, num_layers)
    return skip_key(rest, rest)


def exit_layer_of(key: str, num_layers: int) -> int | None:
    """The exit layer that skip set `key` equals, or None if it is no early exit."""
    attn, mlp = parse_skip_key(key)
    if attn and attn == mlp and attn == tuple(range(attn[0], num_layers)) and attn[0] >= 1:
        return attn[0]
    return None


def layer_key(draft: dict, num_layers: int) -> str:
    """The skip set a draft config's layer draft runs, an early exit as its skip set."""
    lists = draft.get("skip_attn") or draft.get("skip_mlp")
    exit_layer = draft.get("exit_layer")
    if exit_layer is not None and (draft.get("mode") == "early_exit" or not lists):
        return exit_key(int(exit_layer), num_layers)
    return skip_key(draft.get("skip_attn", []), draft.get("skip_mlp", []))


def with_layer_draft(draft: dict, key: str, num_layers: int) -> dict:
    """`draft` running the layer draft `key`: as an early exit when it is one."""
    exit_layer = exit_layer_of(key, num_layers)
    if exit_layer is not None:
        return {**draft, "skip_attn": [], "skip_mlp": [], "exit_layer": exit_layer}
    attn, mlp = parse_skip_key(key)
    return {**draft, "skip_attn": list(attn), "skip_mlp": list(mlp), "exit_layer": None}


def layer_mode(key: str, num_layers: int) -> str:
    """The drafting mode that runs layer draft `key`."""
    return "skip" if exit_layer_of(key, num_layers) is None else "early_exit"
