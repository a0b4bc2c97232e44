"""The engine as a server's replica: its loop on a thread of its own (`Loop`), requests
streamed to asyncio callers (`submit`), the fleet's drafting configs applied between
steps (`apply_draft`), and the `auto` policy's state the fleet reads and sets.
`Engine` takes these methods from `Serving`; `generate` alone needs none of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from types import MappingProxyType

from services.common.params import DraftConfig, SamplingParams
from services.engine.drafting.costs import Costs
from services.engine.drafting.step import Speculator
from services.engine.drafting.telemetry import Telemetry
from services.engine.outputs import Delta, DeltaQueue
from services.engine.scheduler import Scheduler

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # a missed wake-up costs at most this long


class Loop:
    """Calls `step()` while `has_work()`; a step that raises calls `recover()` (which
    fails the requests in progress) and the loop goes on."""

    def __init__(
        self,
        step: Callable[[], None],
        has_work: Callable[[], bool],
        recover: Callable[[], None],
    ) -> None:
        self._step, self._has_work, self._recover = step, has_work, recover
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="selfspec-engine", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """There is new work, or a request to drop: step now rather than after the wait."""
        self._wake.set()

    def stop(self) -> None:
        """End the loop after the step in progress."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping:
            if not self._has_work():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception:  # a fault outside any one request: never kill the loop
                log.exception("engine step failed; failing the requests in progress")
                self._recover()


class Serving:
    """The methods of `Engine` that a server's replica uses."""

    scheduler: Scheduler
    allow_draft_override: bool  # whether `submit` takes a request's own drafting
    _loop: Loop  # runs `Engine.step_once`; `_fail_all` recovers from a failed step
    _step_lock: threading.Lock  # held by `Engine.step_once`
    drafting: Speculator  # the `auto` policy's state lives in it

    # The `auto` policy's state, under the names the serving layer and tests use.

    @property
    def telemetry(self) -> Telemetry:
        return self.drafting.policy.telemetry

    @property
    def costs(self) -> Costs:
        return self.drafting.policy.costs

    @property
    def auto_layer_draft(self) -> bool:
        """Whether `auto` may use the layer draft."""
        return self.drafting.policy.layer_draft

    @auto_layer_draft.setter
    def auto_layer_draft(self, allowed: bool) -> None:
        self.drafting.policy.layer_draft = allowed

    def between_steps(self, fn: Callable, *args):
        """`fn(*args)` run between two steps, for work that borrows the KV pool from
        another thread (the fleet's teacher-forced scoring)."""
        with self._step_lock:
            return fn(*args)

    def start(self) -> None:
        """Run the loop in a background thread, for servers (see `submit`)."""
        self._loop.start()

    @property
    def serving(self) -> bool:
        """Whether the background loop (see `start`) is running."""
        return self._loop.alive

    def shutdown(self) -> None:
        self._loop.stop()

    def _fail_all(self) -> None:
        """After a step failed outside any one request: fail every request in progress."""
        for request, seq in self.scheduler.take_active():
            seq.finish("error", "the engine failed a step; retry")
            self._done(request, seq)

    async def submit(
        self,
        prompt: str | list[int] | list[dict],
        params: SamplingParams | None = None,
        draft: DraftConfig | str | dict | None = None,
        **options,
    ) -> AsyncIterator[Delta]:
        """Stream a request's output as deltas; the loop runs on the engine's thread, so the
        caller's event loop never blocks. With `params.n` > 1 the choices' deltas come
        interleaved, each with its index. Breaking out of the iteration cancels it.
        `options`: `chat`, `add_generation_prompt`, `continue_final_message`, `request_id`
        and `session_id`, as for `add_choices`."""
        if draft is not None and not self.allow_draft_override:
            raise ValueError(
                "this server takes no per-request draft settings (allow_draft_override is off); "
                "leave draft unset"
            )
        self.start()
        deltas = DeltaQueue(params.n if params else 1)
        seq = self.add_request(prompt, params, draft, on_update=deltas.put, **options)
        try:
            async for delta in deltas:
                yield delta
        finally:
            if not deltas.finished:
                self.abort(seq.id)

    # -- fleet configuration: hooks for services.serve.fleet_link ---------------------------
    # A fleet link applies the controller's versioned configs here, between steps, and
    # scores candidate skip sets in spare moments. With no link nothing below changes
    # what the engine does.

    config_version: int = 0  # the fleet config applied last; 0: none
    _bucket_drafts: Mapping[int, DraftConfig] = MappingProxyType({})

    def apply_draft(
        self,
        cfg: DraftConfig,
        version: int,
        by_bucket: Mapping[int, DraftConfig] | None = None,
    ) -> None:
        """Make `cfg` the default drafting of new requests, with per-batch-bucket variants
        for steps at those batch sizes; running requests keep theirs. Waits for the step
        in progress, so it applies between steps."""
        for c in (cfg, *(by_bucket or {}).values()):
            c.check_layers(self.model.num_layers)
            self._check_draft_model(c)
            if c.max_draft > cfg.max_draft:
                raise ValueError("a bucket may not draft more than the base config")
        with self._step_lock:
            self.default_draft = cfg
            self._bucket_drafts = MappingProxyType(dict(by_bucket or {}))
            # The fleet measured that the layer draft pays when it asks `auto` to use one.
            if cfg.mode == "auto" and cfg.layer_mode is not None:
                self.auto_layer_draft = True
            self.config_version = version
