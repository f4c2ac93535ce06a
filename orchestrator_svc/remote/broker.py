"""The broker both sides of ``executor = "celery"`` share: the Celery app, the queue topology
and the settings without which work would be lost or run twice.

One quorum queue per ``--queue`` (default ``stepflow.children``) holds the messages, each a
parcel of a step's children; its dead-letter queue ``NAME.dead`` receives a message the
broker gave up on (its runner was lost every time it held it), and a runner fails its
children ``runner_lost``. The rest is what keeps a message from being lost or run twice:

- acknowledged late (after its children's ends are committed), so a runner lost mid-child
  leaves the message to the broker, which gives it to another runner at once;
- one message prefetched per slot, so a runner never holds work another could run;
- broker heartbeats, so a frozen runner's connection (and with it its messages) is dropped;
- a quorum queue (replicated, durable) with a delivery limit, so a message that kills its
  runner each time ends in ``NAME.dead`` instead of going round for ever;
- publisher confirms, so the orchestrator records a message published only once the broker
  has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu import Connection, Exchange, Queue

from stepflow_common.errors import InvalidArgument, StepflowError

DEFAULT_QUEUE = "stepflow.children"
TASK_NAME = "stepflow.run_children"
DEFAULT_HEARTBEAT_S = 10.0
DELIVERY_LIMIT = 2
"""Returns the broker allows a message before dead-lettering it: three deliveries, each lost
with its runner, are the three interruptions after which a child fails ``runner_lost``."""

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
CONNECT_RETRIES = 3


class BrokerUnreachable(StepflowError):
    """The broker cannot be reached (or refuses the credentials)."""


def connect(connection: Connection, url: str) -> None:
    """Connect now, or raise BrokerUnreachable naming the broker (without its password)."""
    try:
        connection.ensure_connection(max_retries=CONNECT_RETRIES)
    except Exception as exc:
        where = urlsplit(url)
        host = f"{where.hostname or '?'}:{where.port or 5672}"
        raise BrokerUnreachable(
            f"--broker-url: cannot reach the broker at {host} ({exc}); start RabbitMQ or fix "
            "the URL"
        ) from exc


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the messages go: ``--broker-url``, ``--queue``, ``--broker-heartbeat``."""

    url: str
    queue: str = DEFAULT_QUEUE
    heartbeat_s: float = DEFAULT_HEARTBEAT_S

    @property
    def dead_queue(self) -> str:
        return f"{self.queue}.dead"


def check_broker_url(url: str, flag: str = "--broker-url") -> str:
    """The URL, if it names a RabbitMQ (AMQP) broker: another transport (Redis, SQS) redelivers
    a lost runner's message only after a visibility timeout, or not at all, and would hold a
    child ``running`` that nothing runs."""
    scheme = urlsplit(url).scheme
    if scheme not in AMQP_SCHEMES:
        raise InvalidArgument(
            f"{flag}: expected an AMQP URL such as amqp://USER:PASSWORD@HOST:5672// "
            f"(RabbitMQ), got {scheme + '://' if scheme else repr(url)}: other brokers "
            "redeliver a lost runner's work late or never"
        )
    return url


def check_queue_name(name: str, flag: str = "--queue") -> str:
    if not name or len(name) > 200 or not all(c.isalnum() or c in "._-:" for c in name):
        raise InvalidArgument(f"{flag}: 1 to 200 letters, digits or . _ - :, got {name[:40]!r}")
    if name.endswith(".dead"):
        raise InvalidArgument(f"{flag}: {name!r} is the name of a dead-letter queue")
    return name


def queues(name: str) -> tuple[Queue, Queue]:
    """The work queue and its dead-letter queue, declared the same way by every process (a
    queue declared with other arguments is refused by the broker: see ``declare``)."""
    dead = f"{name}.dead"
    work = Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": dead,
            "x-dead-letter-routing-key": dead,
        },
    )
    dead_letters = Queue(
        dead,
        Exchange(dead, type="direct", durable=True),
        routing_key=dead,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
    return work, dead_letters


def make_app(settings: BrokerSettings, *, concurrency: int = 1) -> Celery:
    """The Celery app of one orchestrator or runner."""
    work, _ = queues(settings.queue)
    app = Celery("stepflow", broker=settings.url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=concurrency,
        broker_heartbeat=settings.heartbeat_s,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={"confirm_publish": True},
        task_queues=[work],
        task_default_queue=settings.queue,
        task_default_exchange=settings.queue,
        task_default_routing_key=settings.queue,
        task_create_missing_queues=False,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer="orchestrator_svc.remote.consumer:Consumer",
    )
    return app


SAFE_SETTINGS: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
}


def unsafe_settings(app: Celery) -> list[str]:
    """The settings of ``app`` that would lose or duplicate work ([] if none)."""
    problems = [
        f"{key} = {app.conf.get(key)!r} (needs {value!r})"
        for key, value in SAFE_SETTINGS.items()
        if app.conf.get(key) != value
    ]
    heartbeat = app.conf.get("broker_heartbeat") or 0
    if heartbeat <= 0:
        problems.append("broker_heartbeat is off (a frozen runner would keep its messages)")
    options = app.conf.get("broker_transport_options") or {}
    if not options.get("confirm_publish"):
        problems.append("publisher confirms are off (a publish could be lost unseen)")
    return problems


def declare(connection: Connection, name: str) -> None:
    """Declare the queues (idempotent). A queue of that name declared otherwise (a classic
    queue, no delivery limit) is refused by the broker; that is a configuration error."""
    channel = connection.default_channel
    for queue in queues(name):
        try:
            queue.bind(channel).declare()
        except Exception as exc:
            if "PRECONDITION_FAILED" in str(exc) or "inequivalent" in str(exc):
                raise InvalidArgument(
                    f"queue {queue.name!r} exists on the broker with other settings ({exc}); "
                    "it must be a quorum queue with a delivery limit and a dead-letter queue: "
                    "delete it (when empty) or choose another --queue"
                ) from exc
            raise
