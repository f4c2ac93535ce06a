"""The Prometheus endpoints, scraped from real `serve` processes after real work.

The monitor gets --metrics-port as a flag, the orchestrator as its environment variable
(STEPFLOW_ORCHESTRATOR_METRICS_PORT), so both ways of switching it on are covered. A job with
children runs through both services, a failing call and a deadline are provoked, and then
every metric the README documents must be on the pages with the values that work implies.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families

from orchestrator_svc import definitions
from orchestrator_svc.demo_services import ServiceProcess, free_port, start_service, wait_serving
from stepflow_common.proto_status import TERMINAL_PB as TERMINAL
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

BIN = Path(sys.executable).parent
MONITOR = "stepflow.v1.MonitorService"
ORCHESTRATOR = "stepflow.v1.OrchestratorService"
WAIT_S = 30.0
JOB = {
    "name": "metrics",
    "steps": [
        {
            "name": "work",
            "type": "simulate",
            "config": {"children": 30, "duration_ms": 1, "fail_every": 10},
        },
        {"name": "handoff", "type": "simulate", "wait": False, "config": {"children": 5}},
    ],
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True, slots=True)
class Pair:
    monitor: ServiceProcess
    orchestrator: ServiceProcess
    monitor_metrics: int
    orchestrator_metrics: int


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("metrics")
    monitor_metrics, orchestrator_metrics = free_port(), free_port()
    common = ["--shutdown-grace", "2s", "--log-format", "json"]
    monitor = [str(BIN / "monitor-svc"), "serve", "--database-url", f"sqlite:///{tmp / 'm.db'}",
               "--metrics-port", str(monitor_metrics), "--http-port", "0", *common]  # fmt: skip
    started: list[ServiceProcess] = []
    try:
        started.append(start_service("monitor", MONITOR, monitor, tmp))
        wait_serving(started[0])
        started.append(
            start_service(
                "orchestrator",
                ORCHESTRATOR,
                [str(BIN / "orchestrator-svc"), "serve", "--monitor", started[0].address, *common],
                tmp,
                env={"STEPFLOW_ORCHESTRATOR_METRICS_PORT": str(orchestrator_metrics)},
            )
        )
        wait_serving(started[1])
        yield Pair(started[0], started[1], monitor_metrics, orchestrator_metrics)
    finally:
        codes = {service.name: service.stop() for service in reversed(started)}
    assert codes == {"orchestrator": 0, "monitor": 0}, codes


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _run_job(pair: Pair) -> None:
    with grpc.insecure_channel(pair.orchestrator.address) as channel:
        submitted = o_grpc.OrchestratorServiceStub(channel).SubmitJob(
            o.SubmitJobRequest(definition=definitions.to_proto(definitions.from_mapping(JOB))),
            timeout=10,
        )
    with grpc.insecure_channel(pair.monitor.address) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            job = stub.GetJob(m.GetJobRequest(job_id=submitted.manager_id), timeout=5).job
            if job.status in TERMINAL:
                return
            time.sleep(0.05)
    pytest.fail(f"job {submitted.manager_id} did not end within {WAIT_S}s")


def _provoke_error_and_deadline(pair: Pair) -> None:
    with grpc.insecure_channel(pair.monitor.address) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetJob(m.GetJobRequest(job_id="no-such-job"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # A job whose own deadline passes is failed by the monitor's deadline timer.
        stub.CreateJob(
            m.CreateJobRequest(
                kind=job_pb2.JOB_KIND_MANAGER,
                name="times-out",
                timeout=duration_pb2.Duration(nanos=200_000_000),
            ),
            timeout=5,
        )


def _eventually(port: int, ready: str, **labels: str) -> Samples:
    """Scrape until ``ready`` is positive (the deadline fires a moment after it is due)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = scrape(port)
        if (value(samples, ready, **labels) or 0) > 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_metrics_endpoints_show_the_work(pair: Pair) -> None:
    _run_job(pair)
    _provoke_error_and_deadline(pair)

    mon = _eventually(pair.monitor_metrics, "stepflow_monitor_deadlines_fired_total")
    assert (value(mon, "stepflow_monitor_deadlines_fired_total") or 0) >= 1
    ok = {"service": MONITOR, "code": "OK"}
    assert (value(mon, "stepflow_rpc_handled_total", method="CreateJob", **ok) or 0) >= 3
    assert (value(mon, "stepflow_rpc_duration_seconds_count", method="CreateJob", **ok) or 0) >= 3
    assert value(mon, "stepflow_rpc_handled_total", service=MONITOR, method="GetJob",
                 code="NOT_FOUND") == 1  # fmt: skip
    # 35 children: a CREATED, RUNNING and end event each, plus one seal per step.
    accepted = value(mon, "stepflow_monitor_child_events_total", outcome="accepted") or 0
    assert accepted >= 35 * 3 + 2
    commits = value(mon, "stepflow_monitor_commit_seconds_count") or 0
    assert commits > 0
    assert (value(mon, "stepflow_monitor_commit_units_sum") or 0) >= commits

    orc = scrape(pair.orchestrator_metrics)
    assert value(orc, "stepflow_rpc_handled_total", service=ORCHESTRATOR, method="SubmitJob",
                 code="OK") == 1  # fmt: skip
    assert (value(orc, "stepflow_orchestrator_ack_lag_seconds_count") or 0) > 0
    assert value(orc, "stepflow_orchestrator_unacked_events") == 0  # all acknowledged
    # Outcome counters: the job completed; its two steps ended completed; of the 30
    # children of "work", every 10th failed.
    assert value(orc, "stepflow_orchestrator_jobs_finished_total", status="completed") == 1
    assert (
        value(
            orc, "stepflow_orchestrator_steps_finished_total", type="simulate", status="completed"
        )
        == 2
    )
    children = {
        status: value(
            orc, "stepflow_orchestrator_children_finished_total", type="simulate", status=status
        )
        for status in ("completed", "failed")
    }
    assert children == {"completed": 32, "failed": 3}, children


def test_each_page_shows_its_own_service(pair: Pair) -> None:
    """No page carries the other service's metrics as zeros."""
    names = {
        pair.monitor_metrics: {name for name, _ in scrape(pair.monitor_metrics)},
        pair.orchestrator_metrics: {name for name, _ in scrape(pair.orchestrator_metrics)},
    }
    monitor, orchestrator = names[pair.monitor_metrics], names[pair.orchestrator_metrics]
    assert not {n for n in monitor if n.startswith("stepflow_orchestrator_")}, monitor
    assert not {n for n in orchestrator if n.startswith("stepflow_monitor_")}, orchestrator
    assert "stepflow_monitor_commit_seconds_count" in monitor
    assert "stepflow_orchestrator_ack_lag_seconds_count" in orchestrator
    for page in (monitor, orchestrator):
        assert "process_resident_memory_bytes" in page


def test_metrics_are_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --metrics-port (or its variable) nothing listens: the flag defaults to 0."""
    from monitor_svc.cli import build_parser as monitor_parser
    from orchestrator_svc.cli import build_parser as orchestrator_parser

    monkeypatch.delenv("STEPFLOW_MONITOR_METRICS_PORT", raising=False)
    monkeypatch.delenv("STEPFLOW_ORCHESTRATOR_METRICS_PORT", raising=False)
    assert monitor_parser().parse_args(["serve"]).metrics_port == 0
    assert orchestrator_parser().parse_args(["serve"]).metrics_port == 0
