"""The runner's Celery consumer: Celery's own, without the parts a runner must not have.

Left out: native delayed delivery (it declares two dozen queues for ETA tasks, which stepflow
never sends: a retry waits in its runner, as the step's ``retries`` policy says), and the
cluster chatter (mingle, gossip, worker heartbeat events) nothing here listens to.
"""

from __future__ import annotations

from celery.worker.consumer import consumer as celery_consumer

_LEFT_OUT = {
    "celery.worker.consumer.delayed_delivery:DelayedDelivery",
    "celery.worker.consumer.mingle:Mingle",
    "celery.worker.consumer.gossip:Gossip",
    "celery.worker.consumer.heart:Heart",
}


class Consumer(celery_consumer.Consumer):  # type: ignore[misc]
    class Blueprint(celery_consumer.Consumer.Blueprint):  # type: ignore[misc]
        default_steps = [
            step
            for step in celery_consumer.Consumer.Blueprint.default_steps
            if step not in _LEFT_OUT
        ]
