"""Keeps a replica's registry equal to its source of models (the database), within a poll interval.

:class:`RegistryPoller` asks a :class:`ModelSource` for a cheap change token every ``interval_s``;
only when it moved does it load every model (spec + active Ψ + creation time), build the registry
entries (:meth:`ModelEntry.from_spec`) and swap a whole new snapshot in. The poller knows nothing
of SQL: ``app.py`` wires it to the store (``gateway.store.models.TableModelSource``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Sequence
from typing import Protocol

from gateway.serving.registry import ModelEntry, Registry
from gateway.spec import StoredModel
from gateway.tasks import cancel_and_wait

logger = logging.getLogger("uniroute.registry")


class ModelSource(Protocol):
    """Where the registry's models live. Both calls block (the poller runs them in a thread)."""

    def change_token(self) -> Hashable:
        """Cheap; changes whenever a model or an active profile changes."""
        ...

    def load_models(self) -> Sequence[StoredModel]:
        """Every enabled model, with its active Ψ (None: not profiled)."""
        ...


def build_entries(models: Sequence[StoredModel]) -> list[ModelEntry]:
    """Registry entries of ``models``; a model whose ``os.environ/NAME`` is unset is left out (and logged)."""
    out = []
    for m in models:
        try:
            out.append(ModelEntry.from_spec(m.spec, m.psi, m.created))
        except ValueError as exc:
            logger.error("registry: %s; model left out", exc)
    return out


class RegistryPoller:
    """Keeps one replica's registry equal to ``source``, within ``interval_s``."""

    def __init__(self, source: ModelSource, registry: Registry, interval_s: float = 2.0) -> None:
        self.source = source
        self.registry = registry
        self.interval_s = interval_s
        self._token: Hashable | None = None
        self._task: asyncio.Task[None] | None = None

    def refresh(self, force: bool = False) -> bool:
        """Re-read when the change token moved (blocking; call in a thread). True when replaced."""
        token = self.source.change_token()
        if token == self._token and not force:
            return False
        entries = build_entries(self.source.load_models())
        self.registry.replace(entries)
        self._token = token
        logger.info("registry: %d models (%d routable with a profile)", len(entries),
                    sum(1 for e in entries if e.routable and e.psi is not None))
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:  # the database may be briefly unreachable: keep the last snapshot
                logger.warning("registry poll failed (%s: %s); keeping the current models", type(exc).__name__, exc)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="registry-poller")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
