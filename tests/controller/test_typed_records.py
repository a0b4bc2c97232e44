"""A fleet record is applied only if every field has its exact type and range (issue 18,
check 6): each mutant of a valid record is either refused (and reported, with the last
good config kept) or applied, after which the engine still generates exactly."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass

from controller_helpers import replica
from waiting import wait_for

from services.common import redis_schema as rs
from services.common.params import MAX_DRAFT_TOKENS, MAX_SHORTLIST, MAX_SKIP_LAYERS, SamplingParams
from services.controller import client
from services.controller.admin import Admin
from services.controller.controller import Controller
from services.controller.store import ConfigStore
from services.serve.fleet_link import FleetLink

MODEL = "smollm"
PROMPTS = ["Name three colours.", "Count from one to five."]
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)
FULL = {"skip_attn": [], "skip_mlp": [], "exit_layer": None, "max_draft": 3, "threshold": 0.0}
FULL |= {"shortlist": 0, "ngram_max": 4, "ngram_min": 1}
# Two valid drafts: a skip set, and `auto` exiting early (a layer draft only `auto`'s
# fields name). Bucket "1" is what a one-prompt step runs; two prompts run the base.
BASES = {
    "skip": {**FULL, "mode": "skip", "skip_attn": [8, 26]},
    "exit": {**FULL, "mode": "auto", "exit_layer": 20},
}
BUCKET = {"mode": "ngram", "max_draft": 2, "threshold": 0.0}

# What a wrong serializer, a typo or a bad computation makes of a value.
TYPE_MUTATIONS = {
    "float": lambda v: float(v) if _number(v) else 1.0,
    "fraction": lambda v: float(v) + 0.5 if _number(v) else 0.5,
    "true": lambda v: True,
    "false": lambda v: False,
    "string": lambda v: str(v),
    "null": lambda v: None,
    "list": lambda v: [v],
    "object": lambda v: {"value": v},
}
RANGE_MUTATIONS = {
    "negative": lambda v: -1,
    "zero": lambda v: 0,
    "huge": lambda v: 10**12,
    "nan": lambda v: float("nan"),
}
# Values at and past each limit, and every mode: most of these are valid.
EDGES = {
    "mode": ["off", "skip", "early_exit", "ngram", "auto", "", "SKIP", "warp"],
    "max_draft": [1, MAX_DRAFT_TOKENS, MAX_DRAFT_TOKENS + 1],
    "threshold": [0, 0.99, 1.0, float("inf")],
    "shortlist": [1, MAX_SHORTLIST, MAX_SHORTLIST + 1],
    "ngram_max": [1, 16, 17],
    "ngram_min": [4, 5],
    "exit_layer": [1, 29, 30],
}
LIST_MUTATIONS = [
    [8.0],
    [True],
    ["8"],
    [None],
    [[8]],
    [-1],
    [10**12],
    [8, 8, 26],
    list(range(30)),
    list(range(MAX_SKIP_LAYERS + 1)),
    8,
    "8,26",
    None,
    {},
]


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def field_values(name: str, value) -> dict[str, object]:
    if name in ("skip_attn", "skip_mlp"):
        return {f"list{i}": v for i, v in enumerate(LIST_MUTATIONS)}
    out = {k: m(value) for k, m in (TYPE_MUTATIONS | RANGE_MUTATIONS).items()}
    return out | {f"edge{i}": v for i, v in enumerate(EDGES.get(name, []))}


@dataclass(frozen=True)
class Mutant:
    base: str  # which of BASES
    part: str  # "draft" or "bucket"
    field: str
    value: object

    @property
    def name(self) -> str:
        return f"{self.base}.{self.part}.{self.field}={self.value!r:.40}"

    def apply(self, draft: dict, bucket: dict) -> rs.Record:
        if self.part == "draft":
            return record({**draft, self.field: self.value}, bucket)
        return record(draft, {**bucket, self.field: self.value})


def mutants() -> dict[str, Mutant]:
    """Every single-field mutation of the draft and of the bucket override, of each base."""
    out = {}
    for base_name, base in BASES.items():
        for part, fields in (("draft", base), ("bucket", BUCKET)):
            for name, value in fields.items():
                for how, v in field_values(name, value).items():
                    out[f"{base_name}.{part}.{name}={how}"] = Mutant(base_name, part, name, v)
    return out


def record(draft: dict, bucket: dict) -> rs.Record:
    """As a replica reads it: through JSON, so 4.0 stays a float and True a bool."""
    rec = rs.Record(MODEL, draft, {"1": bucket}, version=1)
    return rs.Record.parse(rec.to_json())


def classify(num_layers: int) -> tuple[dict, dict]:
    """(applied: name -> configs, refused: name -> why) for every mutant."""
    applied, refused = {}, {}
    for name, m in mutants().items():
        try:
            applied[name] = m.apply(BASES[m.base], BUCKET).drafts(num_layers)
        except rs.RecordError as exc:
            refused[name] = str(exc)
    return applied, refused


def right_type(field: str, value) -> bool:
    """The schema's types, written out independently of DraftConfig."""
    if field == "mode":
        return isinstance(value, str)
    if field in ("skip_attn", "skip_mlp"):
        return isinstance(value, list) and all(_int(v) for v in value)
    if field == "threshold":
        return _number(value)
    return _int(value) or (field == "exit_layer" and value is None)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def test_wrong_types_are_never_applied_and_refusals_name_the_field(engine):
    applied, refused = classify(engine.model.num_layers)
    assert len(applied) + len(refused) > 300 and len(applied) > 50
    for name, m in mutants().items():
        if not right_type(m.field, m.value):
            assert name in refused, f"{m.name} was applied"
            assert m.field in refused[name], (m.name, refused[name])
    assert refused["skip.draft.max_draft=float"].endswith("max_draft must be an integer, got 3.0")
    assert "bucket 1: max_draft" in refused["skip.bucket.max_draft=fraction"]
    assert "exit_layer must be between 1 and 29" in refused["exit.draft.exit_layer=huge"]
    assert "skip_attn has 1025 entries" in refused["skip.draft.skip_attn=list9"]


def exact(engine, reference: list[list[int]], parts=("draft", "bucket")) -> None:
    """Two prompts (a step at batch 2 runs the base draft) and one (bucket 1 runs the
    bucket's) generate what drafting off generates."""
    if "draft" in parts:
        assert [c.token_ids for c in engine.generate(PROMPTS, PARAMS)] == reference
    if "bucket" in parts:
        assert [c.token_ids for c in engine.generate(PROMPTS[:1], PARAMS)] == reference[:1]


@dataclass
class Group:
    """Applied mutations of one base, together in one record."""

    base: str
    draft: dict
    bucket: dict
    mutants: list[Mutant]

    def record(self) -> rs.Record:
        return record(self.draft, self.bucket)

    def takes(self, m: Mutant, num_layers: int) -> bool:
        """Whether `m` can join: a field mutated at most once, a mutation that changes
        which draft runs alone in its part (it would hide the rest), and the record
        still valid."""
        same_part = [a for a in self.mutants if a.part == m.part]
        if m.base != self.base or any(a.field == m.field for a in same_part):
            return False
        if same_part and (switches(m, num_layers) or switches(same_part[0], num_layers)):
            return False
        try:
            m.apply(self.draft, self.bucket).drafts(num_layers)
        except rs.RecordError:
            return False
        return True

    def add(self, m: Mutant) -> None:
        rec = m.apply(self.draft, self.bucket)
        self.draft, self.bucket = rec.draft, rec.buckets["1"]
        self.mutants.append(m)


def switches(m: Mutant, num_layers: int) -> bool:
    """Whether `m` changes the drafting mode or the layer draft `auto` runs."""
    before = record(BASES[m.base], BUCKET).drafts(num_layers)
    after = m.apply(BASES[m.base], BUCKET).drafts(num_layers)
    modes = [(c.mode, c.layer_mode) for c in (before[0], *before[1].values())]
    return modes != [(c.mode, c.layer_mode) for c in (after[0], *after[1].values())]


def groups(num_layers: int) -> list[Group]:
    """The applied mutants that change a config, packed into few valid records: one
    generation then checks every mutation in a record."""
    packed: list[Group] = []
    for m in mutants().values():
        unmutated = record(BASES[m.base], BUCKET).drafts(num_layers)
        try:
            if m.apply(BASES[m.base], BUCKET).drafts(num_layers) == unmutated:
                continue  # the same config as the base: nothing new to run
        except rs.RecordError:
            continue  # refused
        group = next((g for g in packed if g.takes(m, num_layers)), None)
        if group is None:
            group = Group(m.base, BASES[m.base], BUCKET, [])
            packed.append(group)
        group.add(m)
    return packed


def test_every_applied_mutant_generates_exactly(engine):
    e = replica(engine, kv_cache_bytes=32 << 20)
    reference = [c.token_ids for c in e.generate(PROMPTS, PARAMS, "off")]
    packed = groups(e.model.num_layers)
    for version, group in enumerate(packed, 1):
        base, by_bucket = group.record().drafts(e.model.num_layers)
        e.apply_draft(base, version, by_bucket)  # as the fleet link does
        try:
            # A base mutation runs in the base; the bucket's fields only in the bucket.
            exact(e, reference, {m.part for m in group.mutants})
        except Exception as exc:  # a failed step, or a refused request: name the mutants
            names = [m.name for m in group.mutants]
            raise AssertionError(f"applied mutants {names} broke generation") from exc
    # Most valid mutants run, packed few to a generation (which keeps this test short).
    assert sum(len(g.mutants) for g in packed) > 40 and len(packed) <= 16
    assert e.stats()["kv_blocks_in_use"] == 0


# The real path for a handful: published by the store, refused by a fleet link, reported
# to the rejections stream, in the replica's heartbeat and by `selfspec controller status`.
THROUGH_THE_FLEET = [
    "skip.draft.max_draft=fraction",  # 3.5: the example
    "skip.draft.max_draft=float",  # 3.0: whole, still no int
    "skip.draft.threshold=true",
    "skip.draft.skip_attn=list2",  # ["8"]
    "exit.draft.exit_layer=huge",
    "skip.bucket.max_draft=float",
    "skip.bucket.mode=null",
]


def status_text(controller: Controller, capsys) -> str:
    """What `selfspec controller status` prints, from the admin service's reply."""
    stub = types.SimpleNamespace(GetStatus=lambda *a, **k: Admin(controller)._status())
    capsys.readouterr()
    client.COMMANDS["status"](stub, types.SimpleNamespace(json=False))
    return capsys.readouterr().out


def heartbeat(controller: Controller) -> dict:
    return client.status_dict(Admin(controller)._status())["models"][MODEL]["replicas"]["r0"]


def linked_replica(engine, redis_server):
    """A small replica, its greedy reference output, and its started link to the fleet."""
    e = replica(engine, kv_cache_bytes=32 << 20)
    reference = [c.token_ids for c in e.generate(PROMPTS, PARAMS, "off")]
    fl = FleetLink(e, redis_server.url, MODEL, "r0", interval_s=0.2, poll_s=0.5, score=False)
    fl.start()
    return e, reference, fl


def test_fleet_link_refuses_reports_and_keeps_the_last_good_config(engine, redis_server, capsys):
    e, reference, fl = linked_replica(engine, redis_server)
    try:
        store = ConfigStore(redis_server.client())
        all_mutants = {n: m.apply(BASES[m.base], BUCKET) for n, m in mutants().items()}
        good = store.publish(record(BASES["skip"], BUCKET), None).version
        wait_for(lambda: fl.version == good, what="the good version")
        kept = e.default_draft
        for n, name in enumerate(THROUGH_THE_FLEET, 1):
            v = store.publish(all_mutants[name], None).version
            wait_for(lambda n=n: len(store.rejections(MODEL, 100)) >= n, what=name)
            assert fl.rejected[v] and fl.version == good and e.default_draft == kept
        exact(e, reference)  # still serving, with the last good config
        controller = Controller(redis_server.url, "ctl")
        text = status_text(controller, capsys)
        # The replica's heartbeat carries its newest five refusals too.
        wait_for(lambda: len(heartbeat(controller)["rejected"]) == 5, what="the heartbeat")
    finally:
        fl.stop()
    # Status shows the newest refusals: the last record's bucket had no mode.
    assert f"refused: version {v} by r0: version {v}: bucket 1: draft mode" in text
    rows = store.rejections(MODEL, 100)
    assert {int(r["kept_version"]) for r in rows} == {good}
    reasons = " | ".join(r["reason"] for r in rows)
    for words in (
        "got 3.5",
        "got 3.0",
        "threshold must be a number, got True",
        "skip_attn",
        "exit_layer",
    ):
        assert words in reasons
    assert "bucket 1: draft mode must be one of" in reasons


def test_an_applied_mutant_through_the_fleet_generates(engine, redis_server):
    e, reference, fl = linked_replica(engine, redis_server)
    try:
        store = ConfigStore(redis_server.client())
        # threshold 0, an int: a number in range, so applied.
        m = mutants()["exit.draft.threshold=zero"]
        rec = m.apply(BASES[m.base], BUCKET)
        assert type(json.loads(rec.to_json())["draft"]["threshold"]) is int
        v = store.publish(rec, None).version
        wait_for(lambda: fl.version == v, what="the mutant's version")
        assert e.default_draft.exit_layer == 20 and e.default_draft.threshold == 0.0
        exact(e, reference)
    finally:
        fl.stop()
    assert not store.rejections(MODEL, 10)
