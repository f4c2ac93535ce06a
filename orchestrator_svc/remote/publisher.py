"""The orchestrator's side of the broker: publishes parcels, confirmed, off the event loop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from orchestrator_svc.remote import broker
from orchestrator_svc.remote.parcel import Parcel


class Publisher:
    """Publishes parcels to ``settings.queue``; one thread, so the event loop never waits on
    the broker's socket and messages leave in the order they were given."""

    def __init__(self, settings: broker.BrokerSettings) -> None:
        self.settings = settings
        self.app = broker.make_app(settings)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="stepflow-publish")
        self._declared = False

    def _publish(self, parcels: Sequence[Parcel]) -> None:
        if not self._declared:
            with self.app.connection_for_write() as connection:
                broker.declare(connection, self.settings.queue)
            self._declared = True
        # A pooled producer: one connection for every publish, not one per call.
        with self.app.producer_or_acquire() as producer:
            for parcel in parcels:
                self.app.send_task(
                    broker.TASK_NAME,
                    kwargs=parcel.to_kwargs(),
                    task_id=uuid.uuid4().hex,
                    queue=self.settings.queue,
                    routing_key=self.settings.queue,
                    producer=producer,
                    retry=True,
                )

    async def publish(self, parcels: Sequence[Parcel]) -> None:
        """Return once the broker has confirmed every parcel (each a message of its own)."""
        if parcels:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._publish, parcels)

    def _consumers(self) -> int:
        with self.app.connection_for_write() as connection:
            _, _, consumers = connection.default_channel.queue_declare(
                self.settings.queue, passive=True
            )
            return int(consumers)

    async def consumers(self) -> int:
        """How many runners take from the queue now (their Celery consumers)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._consumers)

    def check(self) -> None:
        """Connect and declare the queues now (blocking): a wrong URL, or a queue declared
        otherwise, stops the orchestrator at start instead of failing its first step."""
        with self.app.connection_for_write() as connection:
            broker.connect(connection, self.settings.url)
            broker.declare(connection, self.settings.queue)
        self._declared = True

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self.app.close()
