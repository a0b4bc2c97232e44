"""The Redis schema: connection settings, and what makes a config record valid."""

from __future__ import annotations

import json

import pytest
import redis

from services.common import redis_schema as rs


def test_url_from_flag_env_or_default(monkeypatch):
    monkeypatch.delenv(rs.URL_ENV, raising=False)
    assert rs.redis_url(None) == rs.DEFAULT_URL
    monkeypatch.setenv(rs.URL_ENV, "redis://env-host:7000/1")
    assert rs.redis_url(None) == "redis://env-host:7000/1"
    assert rs.redis_url("redis://flag:1/0") == "redis://flag:1/0"
    assert rs.describe("redis://:secret@h:1/0") == "redis://h:1/0"  # never the password


def test_password_from_url_or_env(redis_server, monkeypatch):
    redis_server.client().config_set("requirepass", "s3cret")
    monkeypatch.delenv(rs.PASSWORD_ENV, raising=False)
    with pytest.raises(redis.AuthenticationError):
        rs.connect(redis_server.url).ping()
    with_password = redis_server.url.replace("redis://", "redis://:s3cret@")
    assert rs.connect(with_password).ping()
    monkeypatch.setenv(rs.PASSWORD_ENV, "s3cret")  # the Helm chart's way: overrides the URL
    assert rs.connect(redis_server.url.replace("redis://", "redis://:wrong@")).ping()


def test_record_round_trip_and_validation():
    rec = rs.Record(
        "m",
        {"mode": "skip", "skip_attn": [1, 2], "max_draft": 4},
        {"8": {"mode": "off", "max_draft": 1}},
        version=7,
        by="ctl",
    )
    back = rs.Record.parse(rec.to_json())
    assert back == rec
    base, buckets = back.drafts(num_layers=4)
    assert base.skip_attn == (1, 2) and buckets[8].mode == "off"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda r: r.update(kind="other"), "not a selfspec"),
        (lambda r: r.update(schema=99), "schema 99"),
        (lambda r: r.pop("draft"), "malformed"),
        (lambda r: r["draft"].update(max_draft=8), "hash"),
    ],
)
def test_damaged_records_are_refused(change, error):
    raw = json.loads(rs.Record("m", {"mode": "skip", "skip_attn": [1]}).to_json())
    change(raw)
    with pytest.raises(rs.RecordError, match=error):
        rs.Record.parse(json.dumps(raw))


@pytest.mark.parametrize(
    ("draft", "buckets", "error"),
    [
        ({"mode": "skip", "skip_attn": [9]}, {}, "layers"),
        ({"mode": "skip", "skip_attn": [1], "max_draft": 40}, {}, "max_draft"),
        ({"mode": "warp"}, {}, "draft mode"),
        ({"mode": "skip", "skip_attn": [1], "bogus": 1}, {}, "unknown draft fields"),
        ({"mode": "skip", "skip_attn": ["1"]}, {}, "list of layer numbers"),
        ({"mode": "skip", "skip_attn": [1]}, {"3": {"mode": "off"}}, "bucket"),
        ({"mode": "skip", "skip_attn": [1]}, {"1": {"skip_attn": [2]}}, "overrides"),
        ({"mode": "skip", "skip_attn": [1], "max_draft": 2}, {"1": {"max_draft": 4}}, "more"),
    ],
)
def test_impossible_configs_are_refused(draft, buckets, error):
    with pytest.raises(rs.RecordError, match=error):
        rs.Record("m", draft, buckets, version=3).drafts(num_layers=4)
