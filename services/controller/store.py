"""Config records in Redis: publish (fenced, versioned, announced), read, pin, roll back.

One Lua script writes a record: it checks the writer's lease (decisions only; an
operator's pin or rollback may come through any controller), takes the next
version from the counter, never below `floor` (the highest version anyone has seen:
a Redis restarted without persistence forgets its counter, the replicas do not),
stores the record as current and in the history, trims the history to its newest
`keep` versions (1000 by default: months of decisions, bounded memory), and announces
it. Being one script, it happens entirely or not at all, even if its writer dies
meanwhile.
"""

from __future__ import annotations

import json
import time

from services.common import redis_schema as rs

PUBLISH = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[5]) == 1 then return -2 end
local v = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4])
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[2], v)
end
local record = ARGV[2] .. v .. ARGV[3]
redis.call('SET', KEYS[3], record)
redis.call('HSET', KEYS[4], v, record)
local keep = tonumber(ARGV[8])
if redis.call('HLEN', KEYS[4]) > keep then
  local versions = {}
  for _, k in ipairs(redis.call('HKEYS', KEYS[4])) do
    if tonumber(k) then table.insert(versions, tonumber(k)) end
  end
  table.sort(versions)
  for i = 1, #versions - keep do redis.call('HDEL', KEYS[4], tostring(versions[i])) end
end
redis.call('PUBLISH', ARGV[5], cjson.encode({model = ARGV[6], version = v}))
return v
"""
_MARK = '"version": -424242'
HISTORY_KEEP = 1000


class Fenced(RuntimeError):
    """This controller no longer holds the lease; its write was refused."""


class Pinned(RuntimeError):
    """An operator pinned the model's config; decisions wait until it is unpinned."""


class ConfigStore:
    def __init__(self, redis, keep: int = HISTORY_KEEP) -> None:
        self.redis = redis
        self.keep = keep
        self._publish = redis.register_script(PUBLISH)

    def publish(
        self, record: rs.Record, token: str | None, floor: int = 0, decision: bool = True
    ) -> rs.Record:
        """Write `record` as its model's next version; returns it with the version set.
        `token`: the writer's lease value (None for an operator's write)."""
        record.version = -424242  # a placeholder the script replaces with the version
        head, tail = record.to_json().split(_MARK, 1)
        head += '"version": '
        version = self._publish(
            keys=[
                rs.LEASE,
                rs.VERSION,
                rs.model_key(record.model, "current"),
                rs.model_key(record.model, "history"),
                rs.model_key(record.model, "pin"),
            ],
            args=[
                token or "",
                head,
                tail,
                floor,
                rs.CHANNEL,
                record.model,
                int(decision),
                self.keep,
            ],
        )
        if version == -1:
            raise Fenced("the controller lease is held by another controller")
        if version == -2:
            raise Pinned(f"{record.model} is pinned")
        record.version = int(version)
        return record

    # -- reading -----------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(self.redis.smembers(rs.MODELS))

    def current_text(self, model: str) -> str | None:
        return self.redis.get(rs.model_key(model, "current"))

    def current(self, model: str) -> rs.Record | None:
        """The current record, or None when there is none or it is damaged."""
        text = self.current_text(model)
        try:
            return rs.Record.parse(text) if text else None
        except rs.RecordError:
            return None

    def history(self, model: str, limit: int = 20) -> list[rs.Record]:
        """Readable past records, newest first; damaged ones are left out."""
        versions = sorted(
            (int(v) for v in self.redis.hkeys(rs.model_key(model, "history")) if v.isdigit()),
            reverse=True,
        )[:limit]
        texts = self.redis.hmget(rs.model_key(model, "history"), versions) if versions else []
        out = []
        for text in texts:
            try:
                out.append(rs.Record.parse(text))
            except rs.RecordError:
                continue
        return out

    def record(self, model: str, version: int) -> rs.Record:
        text = self.redis.hget(rs.model_key(model, "history"), version)
        if text is None:
            raise KeyError(f"{model} has no version {version} in its history")
        return rs.Record.parse(text)

    def pinned(self, model: str) -> int:
        value = self.redis.get(rs.model_key(model, "pin"))
        return int(value) if value and value.isdigit() else 0

    def replicas(self, model: str) -> dict[str, dict]:
        out = {}
        for rid, text in self.redis.hgetall(rs.model_key(model, "replicas")).items():
            try:
                out[rid] = json.loads(text)
            except ValueError:
                continue
        return out

    def rejections(self, model: str, count: int = 20) -> list[dict]:
        """Records replicas refused, newest first."""
        entries = self.redis.xrevrange(rs.REJECTIONS, count=10 * count)
        rows = [fields for _, fields in entries if fields.get("model") == model]
        return rows[:count]

    def highest_seen(self, model: str) -> int:
        """The highest version any replica reports running: a floor for the next one."""
        return max((int(r.get("version", 0)) for r in self.replicas(model).values()), default=0)

    # -- operators -----------------------------------------------------------------------

    def pin(self, model: str, version: int, by: str, reason: str = "pin") -> rs.Record:
        """Republish `version` as the newest and hold it."""
        old = self.record(model, version)
        self.redis.set(rs.model_key(model, "pin"), version)  # decisions stop from here
        record = self._copy(old, by, reason, {"pinned_from": version})
        record = self.publish(record, None, self._floor(model), decision=False)
        self.redis.set(rs.model_key(model, "pin"), record.version)
        return record

    def unpin(self, model: str) -> None:
        self.redis.delete(rs.model_key(model, "pin"))

    def rollback(self, model: str, by: str) -> rs.Record:
        """Pin the config that came before the current one (a different one)."""
        history = self.history(model, limit=self.keep)
        if not history:
            raise KeyError(f"{model} has no config history")
        current = history[0]
        for older in history[1:]:
            if older.hash != current.hash:
                return self.pin(model, older.version, by, "rollback")
        raise KeyError(f"{model} has no earlier config different from version {current.version}")

    def _floor(self, model: str) -> int:
        current = self.current(model)
        return max(self.highest_seen(model), current.version if current else 0)

    @staticmethod
    def _copy(old: rs.Record, by: str, reason: str, evidence: dict) -> rs.Record:
        return rs.Record(
            model=old.model,
            draft=old.draft,
            buckets=old.buckets,
            evidence={**evidence, "original_by": old.by, "original_reason": old.reason},
            reason=reason,
            created_at=time.time(),
            by=by,
        )
