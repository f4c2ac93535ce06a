"""Every stepflow metric follows the Prometheus naming conventions, is on a service's page,
and README.md's Metrics table lists exactly those metrics, with their type and labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from monitor_svc import metrics as monitor_metrics
from orchestrator_svc import metrics as orchestrator_metrics
from stepflow_common import metrics

README = Path(__file__).resolve().parents[2] / "README.md"
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# Words that make a metric a time: it must then be measured in seconds.
TIME_WORDS = ("duration", "latency", "lag", "time", "elapsed", "age", "wait", "delay")
# Suffixes that are not base units (or say no unit at all where one is expected).
NOT_BASE_UNITS = (
    "_ms",
    "_milliseconds",
    "_microseconds",
    "_minutes",
    "_hours",
    "_days",
    "_kb",
    "_kib",
    "_mb",
    "_mib",
    "_percent",
    "_size",
    "_length",
    "_count",
    "_sum",
    "_bucket",
)


def _defined() -> list[MetricWrapperBase]:
    """Every metric object the metrics modules (shared, and each service's) define."""
    modules = (metrics, monitor_metrics, orchestrator_metrics)
    return [v for m in modules for v in vars(m).values() if isinstance(v, MetricWrapperBase)]


def _served() -> list[MetricWrapperBase]:
    out = [*metrics.SHARED]
    for collectors in metrics.BY_SERVICE.values():
        out.extend(collectors)
    return [c for c in out if isinstance(c, MetricWrapperBase)]


def _exposed_name(metric: MetricWrapperBase) -> str:
    """The name a page shows (and a query uses): a counter's with its ``_total``."""
    name = str(metric._name)
    return f"{name}_total" if metric._type == "counter" else name


def _labels(metric: MetricWrapperBase) -> tuple[str, ...]:
    return tuple(metric._labelnames)


def test_every_metric_is_on_a_page() -> None:
    """A metric defined but in no service's set would never be scraped."""
    served = {id(c) for c in _served()}
    missing = [_exposed_name(m) for m in _defined() if id(m) not in served]
    assert not missing, f"defined but on no /metrics page: {missing}"
    names = [_exposed_name(m) for m in _served()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("metric", _defined(), ids=_exposed_name)
def test_name_follows_the_conventions(metric: MetricWrapperBase) -> None:
    name, kind = _exposed_name(metric), metric._type
    assert name.startswith("stepflow_"), f"{name}: every metric has the stepflow_ prefix"
    assert SNAKE.match(name), f"{name}: snake_case"
    if kind == "counter":
        assert name.endswith("_total"), f"{name}: a counter ends in _total"
        base = name.removesuffix("_total")
    else:
        assert not name.endswith("_total"), f"{name}: only counters end in _total"
        base = name
    assert not base.endswith(NOT_BASE_UNITS), f"{name}: name the base unit (_seconds, _bytes)"
    words = set(base.split("_"))
    if words & set(TIME_WORDS) or "time" in metric._documentation.lower().split():
        assert base.endswith("_seconds"), f"{name}: a time is measured in _seconds"
    if kind == "gauge":
        assert "total" not in words, f"{name}: a gauge is not a total"
    assert metric._documentation.strip(), f"{name}: has a help text"
    for label in _labels(metric):
        assert SNAKE.match(label), f"{name}: label {label!r} is snake_case"
        assert label not in ("le", "quantile", "job", "instance"), f"{name}: label {label!r}"


def _readme_table() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The Metrics section's table: name -> (type, labels)."""
    text = README.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`stepflow_"):
            continue
        name = cells[0].strip("`")
        labels = re.sub(r"\([^)]*\)", "", cells[2])  # "`outcome` (`accepted`, ...)"
        assert name not in rows, f"README.md lists {name} twice"
        rows[name] = (cells[1], tuple(re.findall(r"`([^`]+)`", labels)))
    return rows


def test_readme_lists_exactly_the_registered_metrics() -> None:
    documented = _readme_table()
    registered = {_exposed_name(m): (m._type, _labels(m)) for m in _served()}
    assert set(documented) == set(registered), (
        f"only in README.md: {sorted(set(documented) - set(registered))}; "
        f"only registered: {sorted(set(registered) - set(documented))}"
    )
    for name, (kind, labels) in registered.items():
        assert documented[name] == (kind, labels), f"README.md on {name}: {documented[name]}"
