"""Graceful shutdown: uvicorn's server, except that SIGTERM drains the service before it stops.

Orchestrators stop a server with SIGTERM and kill it a grace period later. uvicorn would close its
listening socket at once and, once done, re-raise the signal (exit status -15). Here the first
SIGTERM turns /ready to 503 and refuses new work while the socket stays open (a load balancer
probing /ready sees it leave), lets the predictions in flight finish for up to --drain-seconds, then
stops as uvicorn does and exits 0, within a few seconds more whatever the model process does (every wait
after the drain is bounded, and a model process that does not exit is killed). A second SIGTERM or Ctrl-C
kills the model process and stops at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from .service import Service

logger = logging.getLogger(__name__)

CONNECTIONS_GRACE_S = 3.0  # after the drain, how long uvicorn waits for connections to close (unless configured)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, drain_seconds: float) -> None:
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = CONNECTIONS_GRACE_S
        super().__init__(config)
        self._service = service
        self._drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._draining: asyncio.Future | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or self.should_exit:  # a second signal: stop now, whatever waits
            self.force_exit = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._abort, sig)
        if sig != signal.SIGTERM or self._loop is None or self._drain_requested or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        self._loop.call_soon_threadsafe(self._start_drain)  # a signal handler must not touch the loop itself

    def _abort(self, sig: int) -> None:
        logger.warning("%s while stopping: killing the model process and stopping at once", signal.Signals(sig).name)
        self._service.abort()

    def _start_drain(self) -> None:
        logger.info("SIGTERM: draining for up to %g s (--drain-seconds), then stopping", self._drain_seconds)
        self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self._service.drain(self._drain_seconds)
        finally:
            self.should_exit = True
