"""The committed gRPC stubs are what `make stubs` generates from `protos/` now."""

from __future__ import annotations

from services.common import stubs


def test_stubs_are_up_to_date(tmp_path):
    fresh = {p.relative_to(tmp_path): p.read_text() for p in stubs.generate(tmp_path / "gen")}
    fresh = {p.relative_to("gen"): text for p, text in fresh.items()}
    committed = {
        p.relative_to(stubs.GEN): p.read_text()
        for p in stubs.GEN.rglob("*.py*")
        if "__pycache__" not in p.parts and p.name != "__init__.py"
    }
    names = fresh.keys() | committed.keys()
    stale = sorted(str(p) for p in names if fresh.get(p) != committed.get(p))
    assert not stale, f"stubs differ from protos/ in {stale}: run `make stubs` and commit"


def test_messages_pickle_by_their_package():
    """Ray pickles requests between processes; the stubs' module name must import."""
    import pickle

    from services.gen.selfspec.v1 import generation_pb2 as pb

    request = pb.GenerateRequest(prompt="hi", max_tokens=3)
    assert pickle.loads(pickle.dumps(request)) == request
