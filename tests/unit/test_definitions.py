"""Job definitions: every validation error names its field; files, mappings and protos agree."""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2

from orchestrator_svc import definitions as d
from orchestrator_svc.definitions import JobSpec, OnError, StepSpec, ToleranceAction, ToleranceSpec
from orchestrator_svc.workers.base import BaseWorker
from orchestrator_svc.workers.registry import load_registry
from stepflow_common.errors import InvalidArgument
from stepflow_proto.v1 import orchestrator_service_pb2 as pb

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WORKERS = load_registry(plugins=False)

SPEC_EXAMPLE = JobSpec(
    name="nightly-crawl",
    timeout_s=1800.0,
    error_tolerance=ToleranceSpec(max_child_failures=10, action=ToleranceAction.FAIL),
    config={},
    steps=(
        StepSpec(
            name="crawl",
            type="simulate",
            config={"children": 200, "duration_ms": 5, "fail_every": 25, "cancel_every": 0},
            on_error=OnError.CONTINUE,
            depends_on=(),
            wait=False,
            timeout_s=600.0,
            retries=2,
            retry_backoff_s=1.0,
            on_interrupt=d.OnInterrupt.RERUN,
        ),
        StepSpec(
            name="index",
            type="command",
            config={"command": "echo indexing"},
            on_error=OnError.FAIL,
            depends_on=("crawl",),
            wait=True,
            timeout_s=None,
        ),
    ),
)


def valid() -> dict[str, Any]:
    """A fresh, valid definition for a test to break in one place."""
    return {
        "name": "nightly-crawl",
        "timeout": "30m",
        "error_tolerance": {"max_child_failures": 10, "action": "fail"},
        "steps": [
            {
                "name": "crawl",
                "type": "simulate",
                "wait": False,
                "on_error": "continue",
                "timeout": "10m",
                "config": {"children": 200, "duration_ms": 5, "fail_every": 25},
            },
            {
                "name": "index",
                "type": "command",
                "depends_on": ["crawl"],
                "config": {"command": "echo indexing"},
            },
        ],
    }


def error_of(data: Mapping[str, Any], **kwargs: Any) -> str:
    with pytest.raises(InvalidArgument) as info:
        d.from_mapping(data, **kwargs)
    return str(info.value)


# -- the examples ----------------------------------------------------------------------------
def test_spec_example_toml_parses_to_the_expected_spec() -> None:
    assert d.load_file(EXAMPLES / "nightly-crawl.toml", workers=WORKERS) == SPEC_EXAMPLE


def test_spec_example_json_is_the_same_job() -> None:
    assert d.load_file(EXAMPLES / "nightly-crawl.json", workers=WORKERS) == SPEC_EXAMPLE


def test_demo_parses_with_every_builtin_worker_checking_its_config() -> None:
    spec = d.load_file(EXAMPLES / "demo.toml", workers=WORKERS)
    assert [s.name for s in spec.steps] == [
        "crawl",
        "enrich",
        "thumbs",
        "broken",
        "publish",
        "report",
    ]
    assert {s.type for s in spec.steps} == {"simulate", "fanout", "command"}
    assert spec.steps[spec.step_index("enrich")].wait is False
    assert spec.steps[spec.step_index("publish")].depends_on == ("broken",)
    assert spec.steps[spec.step_index("broken")].on_error is OnError.CONTINUE


def test_defaults() -> None:
    spec = d.from_mapping({"name": "j", "steps": [{"name": "a", "type": "command"}]})
    assert spec == JobSpec(name="j", steps=(StepSpec(name="a", type="command"),))
    step = spec.steps[0]
    assert (step.on_error, step.wait, step.depends_on, step.timeout_s, step.config) == (
        OnError.FAIL,
        True,
        (),
        None,
        {},
    )
    assert spec.timeout_s is None and spec.error_tolerance is None and spec.config == {}


def test_tolerance_action_defaults_to_fail() -> None:
    data = valid()
    data["error_tolerance"] = {"max_child_failures": 3}
    assert d.from_mapping(data).error_tolerance == ToleranceSpec(3, ToleranceAction.FAIL)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1800s", 1800.0), (45, 45.0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    data = valid()
    data["timeout"] = text
    data["steps"][0]["timeout"] = text
    spec = d.from_mapping(data)
    assert spec.timeout_s == seconds and spec.steps[0].timeout_s == seconds


def test_json_null_means_absent() -> None:
    data = valid()
    data["timeout"] = None
    data["config"] = None
    data["steps"][1].update(wait=None, on_error=None, depends_on=None, timeout=None, config=None)
    spec = d.from_mapping(data)
    assert spec.timeout_s is None and spec.config == {}
    assert spec.steps[1] == StepSpec(name="index", type="command")


def test_config_is_copied_not_shared() -> None:
    data = valid()
    spec = d.from_mapping(data)
    data["steps"][0]["config"]["children"] = 1
    assert spec.steps[0].config["children"] == 200


# -- every error names its field --------------------------------------------------------------
Mutation = Callable[[dict[str, Any]], object]


def _set(path: str, value: object) -> Mutation:
    """A mutation setting ``a.b.0.c`` (list indices as numbers) to ``value``."""

    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value

    return apply


def _delete(path: str) -> Mutation:
    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[last]

    return apply


ERRORS: list[tuple[str, Mutation, str, str]] = [
    # (id, mutation, field the message starts with, the problem it states)
    ("name-missing", _delete("name"), "name", "required"),
    ("name-empty", _set("name", "  "), "name", "must not be empty"),
    ("name-type", _set("name", 5), "name", "expected a string, got 5"),
    ("name-long", _set("name", "x" * 513), "name", "at most 512 characters"),
    ("top-unknown", _set("timout", "5m"), "timout", "unknown field (expected one of: name, "),
    ("timeout-text", _set("timeout", "5x"), "timeout", "'5x' is not a duration"),
    ("timeout-bool", _set("timeout", True), "timeout", "expected a duration like '90s'"),
    ("timeout-zero", _set("timeout", "0s"), "timeout", "must be greater than zero"),
    ("timeout-inf", _set("timeout", float("inf")), "timeout", "expected a finite duration"),
    ("config-type", _set("config", [1]), "config", "expected a table/object"),
    ("steps-missing", _delete("steps"), "steps", "required"),
    ("steps-empty", _set("steps", []), "steps", "a job needs at least one step"),
    ("steps-type", _set("steps", {"name": "a"}), "steps", "expected a list of steps"),
    ("step-type", _set("steps.1", "index"), "steps[1]", "expected a table/object, got 'index'"),
    ("step-unknown", _set("steps.1.depend_on", ["crawl"]), "steps[1].depend_on", "unknown field"),
    ("step-name-missing", _delete("steps.0.name"), "steps[0].name", "required"),
    ("step-name-empty", _set("steps.0.name", ""), "steps[0].name", "must not be empty"),
    ("step-type-missing", _delete("steps.1.type"), "steps[1].type", "required"),
    ("step-type-type", _set("steps.1.type", ["command"]), "steps[1].type", "expected a string"),
    (
        "duplicate",
        _set("steps.1.name", "crawl"),
        "steps[1].name",
        "'crawl' is already the name of steps[0]",
    ),
    (
        "on-error",
        _set("steps.0.on_error", "stop"),
        "steps[0].on_error",
        "'stop' is not one of 'continue', 'fail', 'fatal'",
    ),
    ("on-error-type", _set("steps.0.on_error", 1), "steps[0].on_error", "expected one of"),
    ("wait-type", _set("steps.0.wait", "no"), "steps[0].wait", "expected true or false, got 'no'"),
    ("step-timeout", _set("steps.0.timeout", "5x"), "steps[0].timeout", "'5x' is not a duration"),
    (
        "step-timeout-negative",
        _set("steps.0.timeout", -5),
        "steps[0].timeout",
        "must be greater than zero",
    ),
    (
        "step-config-type",
        _set("steps.0.config", "children=3"),
        "steps[0].config",
        "expected a table/object",
    ),
    (
        "config-date",
        _set("steps.0.config.when", datetime.date(2024, 1, 1)),
        "steps[0].config.when",
        "a date value cannot be passed",
    ),
    (
        "config-nan",
        _set("steps.0.config.ratio", float("nan")),
        "steps[0].config.ratio",
        "nan is not a finite number",
    ),
    (
        "config-huge-int",
        _set("config", {"seed": 2**60}),
        "config.seed",
        "too large to pass exactly",
    ),
    (
        "config-nested",
        _set("config", {"sub": {"list": [1, {"x": float("inf")}]}}),
        "config.sub.list[1].x",
        "inf is not a finite number",
    ),
    (
        "depends-forward",
        _set("steps.0.depends_on", ["index"]),
        "steps[0].depends_on",
        "'index' is not an earlier step (it is steps[1]",
    ),
    (
        "depends-unknown",
        _set("steps.1.depends_on", ["crawler"]),
        "steps[1].depends_on",
        "'crawler' is not an earlier step (no step has that name)",
    ),
    (
        "depends-self",
        _set("steps.1.depends_on", ["index"]),
        "steps[1].depends_on",
        "'index' is the step itself",
    ),
    (
        "depends-twice",
        _set("steps.1.depends_on", ["crawl", "crawl"]),
        "steps[1].depends_on",
        "'crawl' is listed twice",
    ),
    (
        "depends-type",
        _set("steps.1.depends_on", "crawl"),
        "steps[1].depends_on",
        "expected a list of step names",
    ),
    (
        "depends-item",
        _set("steps.1.depends_on", [0]),
        "steps[1].depends_on[0]",
        "expected a step name",
    ),
    ("tolerance-type", _set("error_tolerance", 10), "error_tolerance", "expected a table/object"),
    (
        "tolerance-unknown",
        _set("error_tolerance.max_failures", 3),
        "error_tolerance.max_failures",
        "unknown field",
    ),
    (
        "tolerance-missing",
        _delete("error_tolerance.max_child_failures"),
        "error_tolerance.max_child_failures",
        "required",
    ),
    (
        "tolerance-negative",
        _set("error_tolerance.max_child_failures", -1),
        "error_tolerance.max_child_failures",
        "must be 0 or more",
    ),
    (
        "tolerance-fraction",
        _set("error_tolerance.max_child_failures", 2.5),
        "error_tolerance.max_child_failures",
        "expected a whole number, got 2.5",
    ),
    (
        "tolerance-bool",
        _set("error_tolerance.max_child_failures", True),
        "error_tolerance.max_child_failures",
        "expected a whole number",
    ),
    (
        "tolerance-action",
        _set("error_tolerance.action", "explode"),
        "error_tolerance.action",
        "'explode' is not one of 'fail', 'continue'",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field", "problem"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_every_error_names_its_field(mutate: Mutation, field: str, problem: str) -> None:
    data = valid()
    mutate(data)
    message = error_of(data)
    assert message.startswith(f"{field}: "), message
    assert problem in message, message


def test_not_a_mapping() -> None:
    assert error_of([1, 2]).startswith("definition: expected a table/object")  # type: ignore[arg-type]


def test_too_many_steps() -> None:
    """No more steps than the monitor records for one manager, so a job that starts can end."""
    data = {"name": "j", "steps": [{"name": f"s{i}", "type": "command"} for i in range(201)]}
    assert error_of(data) == "steps: at most 200 steps, got 201"
    data["steps"].pop()
    assert len(d.from_mapping(data).steps) == 200


def test_integer_settings_accept_whole_doubles() -> None:
    data = valid()
    data["error_tolerance"]["max_child_failures"] = 10.0
    data["steps"][0]["config"] = {"children": 200.0, "duration_ms": 5.0, "concurrency": 4.0}
    spec = d.from_mapping(data, workers=WORKERS)
    assert spec.error_tolerance is not None and spec.error_tolerance.max_child_failures == 10


def test_unknown_step_type_with_known_types() -> None:
    data = valid()
    data["steps"][1]["type"] = "comand"
    message = error_of(data, known_types={"command", "simulate"})
    assert message == "steps[1].type: unknown worker type 'comand' (registered: command, simulate)"


def test_unknown_step_type_with_workers() -> None:
    data = valid()
    data["steps"][0]["type"] = "simulator"
    assert error_of(data, workers=WORKERS) == (
        "steps[0].type: unknown worker type 'simulator' "
        "(registered: command, fanout, python, simulate)"
    )


def test_types_are_not_checked_without_a_registry() -> None:
    data = valid()
    data["steps"][0]["type"] = "anything"
    assert d.from_mapping(data).steps[0].type == "anything"


# -- worker configs, through the validate_config hook -------------------------------------------
@pytest.mark.parametrize(
    ("index", "step", "expected"),
    [
        (0, {"type": "simulate", "config": {}}, "steps[0].config.children: required"),
        (
            0,
            {"type": "simulate", "config": {"children": 2.5}},
            "steps[0].config.children: expected a whole number, got 2.5",
        ),
        (
            0,
            {"type": "simulate", "config": {"children": 5, "concurrency": 0}},
            "steps[0].config.concurrency: must be at least 1, got 0",
        ),
        (
            0,
            {"type": "simulate", "config": {"children": 5, "fail_evry": 2}},
            "steps[0].config.fail_evry: unknown setting",
        ),
        (1, {"type": "command", "config": {}}, "steps[1].config.command: required"),
        (
            1,
            {"type": "command", "config": {"command": "true", "timeout": "soon"}},
            "steps[1].config.timeout: 'soon' is not a duration",
        ),
        (
            1,
            {"type": "command", "config": {"command": "true", "env": {"A": [1]}}},
            "steps[1].config.env.A: expected a string",
        ),
        (
            1,
            {"type": "fanout", "config": {"command": "echo {item}", "items": ["a", {"b": 1}]}},
            "steps[1].config.items[1]: expected a string or number",
        ),
        (
            1,
            {"type": "fanout", "config": {"command": "echo {item}"}},
            "steps[1].config.items: required",
        ),
        (
            1,
            {"type": "python", "config": {"callable": "no colon"}},
            "steps[1].config.callable: 'no colon' is not of the form 'module:function'",
        ),
        (
            1,
            {"type": "python", "config": {"callable": "stepflow_no_such_module:f"}},
            "steps[1].config.callable: no module named 'stepflow_no_such_module'",
        ),
    ],
)
def test_worker_config_errors_name_the_step_and_key(
    index: int, step: dict[str, Any], expected: str
) -> None:
    data = valid()
    data["steps"][index].update(step)
    message = error_of(data, workers=WORKERS)
    assert message.startswith(expected), message


def test_validate_config_hook_wraps_plain_messages() -> None:
    class Picky(BaseWorker):
        type = "picky"

        def validate_config(self, config: Mapping[str, Any]) -> None:
            if config.get("mode") == "bad":
                raise ValueError("mode must be 'good'")
            if "x" in config:
                raise InvalidArgument("x[2]: too big")

    step = StepSpec(name="s", type="picky", config={"mode": "bad"})
    with pytest.raises(InvalidArgument, match=r"^steps\[3\]\.config: mode must be 'good'$"):
        d.validate_config(step, Picky(), where="steps[3].config")
    step = StepSpec(name="s", type="picky", config={"x": 1})
    with pytest.raises(InvalidArgument, match=r"^config\.x\[2\]: too big$"):
        d.validate_config(step, Picky())
    d.validate_config(StepSpec(name="s", type="picky"), Picky())


def test_validate_steps_checks_a_spec_loaded_without_workers() -> None:
    data = valid()
    data["steps"][0]["config"] = {"children": -1}
    spec = d.from_mapping(data)
    with pytest.raises(InvalidArgument, match=r"^steps\[0\]\.config\.children: must be at least 0"):
        d.validate_steps(spec, WORKERS)
    d.validate_steps(d.from_mapping(valid()), WORKERS)


# -- files -------------------------------------------------------------------------------------
def test_toml_and_json_files_load(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(json.dumps(valid()))
    from_json = d.load_file(tmp_path / "job.json")
    (tmp_path / "job.toml").write_text((EXAMPLES / "nightly-crawl.toml").read_text())
    from_toml = d.load_file(str(tmp_path / "job.toml"))
    assert from_json.steps[0].config == {"children": 200, "duration_ms": 5, "fail_every": 25}
    assert from_toml.name == from_json.name == "nightly-crawl"


def test_file_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('name = "j"\n[[steps]]\nname = "a"\ntype = "command"\ntimeout = "5x"\n')
    with pytest.raises(InvalidArgument) as info:
        d.load_file(path)
    assert str(info.value) == (
        f"{path}: steps[0].timeout: '5x' is not a duration (use e.g. '500ms', '90s', '30m', '2h')"
    )


def test_toml_dates_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        'name = "j"\n[[steps]]\nname = "a"\ntype = "t"\nconfig = { when = 2024-01-01 }\n'
    )
    with pytest.raises(
        InvalidArgument, match=r"steps\[0\]\.config\.when: a date value cannot be passed"
    ):
        d.load_file(path)


@pytest.mark.parametrize(
    ("filename", "text", "problem"),
    [
        ("job.toml", 'name = "j"\nname = "k"\n', "not valid TOML"),
        ("job.json", '{"name": "j", "steps": [}', "not valid JSON"),
        (
            "job.json",
            '{"name": "j", "name": "k", "steps": []}',
            "name: duplicate key in JSON object",
        ),
        ("job.yaml", "name: j\n", "unknown file type '.yaml': use .toml or .json"),
        ("job.toml", b"name = '\xff'\n", "not UTF-8 text"),
    ],
)
def test_unparseable_files(tmp_path: Path, filename: str, text: str | bytes, problem: str) -> None:
    path = tmp_path / filename
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InvalidArgument) as info:
        d.load_file(path)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        d.load_file(tmp_path / "absent.toml")


# -- protobuf ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nightly-crawl.toml", "demo.toml"])
def test_proto_round_trip(name: str) -> None:
    spec = d.load_file(EXAMPLES / name, workers=WORKERS)
    message = d.to_proto(spec)
    again = pb.JobDefinition.FromString(message.SerializeToString())
    back = d.from_proto(again, workers=WORKERS)
    assert back == spec
    # Struct carried the ints as doubles; they come back as ints, as they were in the file.
    for step in back.steps:
        for value in step.config.values():
            if isinstance(value, float):
                assert not value.is_integer()


def test_to_proto_uses_the_contract_types() -> None:
    message = d.to_proto(SPEC_EXAMPLE)
    assert message.timeout.ToSeconds() == 1800
    assert message.error_tolerance.action == pb.ERROR_TOLERANCE_ACTION_FAIL
    crawl, index = message.steps
    assert crawl.on_error == pb.ON_ERROR_CONTINUE and crawl.HasField("wait") and not crawl.wait
    assert crawl.timeout.ToMilliseconds() == 600_000
    assert crawl.config["children"] == 200.0
    assert index.on_error == pb.ON_ERROR_FAIL and index.wait and not index.HasField("timeout")
    assert list(index.depends_on) == ["crawl"]


def test_from_proto_defaults_for_unset_fields() -> None:
    message = pb.JobDefinition(name="j", steps=[pb.StepDefinition(name="a", type="command")])
    spec = d.from_proto(message)
    assert spec == JobSpec(name="j", steps=(StepSpec(name="a", type="command"),))
    message.error_tolerance.max_child_failures = 4  # action left UNSPECIFIED
    assert d.from_proto(message).error_tolerance == ToleranceSpec(4, ToleranceAction.FAIL)


def test_from_proto_struct_doubles_become_ints() -> None:
    message = pb.JobDefinition(name="j")
    step = message.steps.add(name="sim", type="simulate")
    step.config.update({"children": 200, "duration_ms": 1.5, "nested": {"list": [3, 0.25]}})
    spec = d.from_proto(message)
    config = spec.steps[0].config
    assert config == {"children": 200, "duration_ms": 1.5, "nested": {"list": [3, 0.25]}}
    assert type(config["children"]) is int and type(config["nested"]["list"][0]) is int
    # ...but 1.5 ms is no whole number, so the simulate worker refuses it by name.
    del step.config["nested"]
    with pytest.raises(
        InvalidArgument, match=r"^steps\[0\]\.config\.duration_ms: expected a whole number"
    ):
        d.from_proto(message, workers=WORKERS)


def test_from_proto_errors_name_fields() -> None:
    def broken(change: Callable[[pb.JobDefinition], object]) -> str:
        message = d.to_proto(SPEC_EXAMPLE)
        change(message)
        with pytest.raises(InvalidArgument) as info:
            d.from_proto(message)
        return str(info.value)

    assert broken(lambda m: setattr(m, "name", "")) == "name: must not be empty"
    assert (
        broken(lambda m: setattr(m.steps[1], "on_error", 9))
        == "steps[1].on_error: unknown OnError value 9"
    )
    assert broken(lambda m: setattr(m.error_tolerance, "action", 7)).startswith(
        "error_tolerance.action: unknown"
    )
    assert broken(lambda m: m.steps[0].timeout.CopyFrom(duration_pb2.Duration())).startswith(
        "steps[0].timeout: must be greater than zero"
    )
    assert broken(lambda m: m.timeout.CopyFrom(duration_pb2.Duration(seconds=1, nanos=-5))) == (
        "timeout: not a valid google.protobuf.Duration"
    )
    assert broken(lambda m: m.steps[1].depends_on.append("later")).startswith(
        "steps[1].depends_on: 'later' is not an earlier step"
    )
    assert broken(lambda m: m.steps.add(name="crawl", type="command")).startswith(
        "steps[2].name: 'crawl' is already the name of steps[0]"
    )


def test_subsecond_timeouts_survive_the_round_trip() -> None:
    spec = JobSpec(name="j", timeout_s=0.5, steps=(StepSpec(name="a", type="t", timeout_s=1.25),))
    assert d.from_proto(d.to_proto(spec)) == spec


def test_spec_values_are_frozen() -> None:
    spec = copy.deepcopy(SPEC_EXAMPLE)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


# -- retries and interruptions -------------------------------------------------------------------
def test_retry_settings_parse_and_default() -> None:
    data = valid()
    data["steps"][0].update(retries=3, retry_backoff="250ms", on_interrupt="fail")
    crawl, index = d.from_mapping(data).steps
    assert (crawl.retries, crawl.retry_backoff_s, crawl.on_interrupt) == (
        3,
        0.25,
        d.OnInterrupt.FAIL,
    )
    assert (index.retries, index.retry_backoff_s, index.on_interrupt) == (
        0,
        1.0,
        d.OnInterrupt.RERUN,
    )


def test_backoff_doubles_per_attempt_up_to_a_minute() -> None:
    retry = StepSpec(name="a", type="command", retries=10, retry_backoff_s=1.0).retry
    assert [retry.delay_before(n) for n in (2, 3, 4, 5, 8, 9)] == [1, 2, 4, 8, 60, 60]
    assert retry.last_attempt() == 11 and retry.last_attempt(interruptions=2) == 13


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("retries", -1, "steps[0].retries: must be between 0 and 100, got -1"),
        ("retries", 101, "steps[0].retries: must be between 0 and 100, got 101"),
        ("retries", 1.5, "steps[0].retries: expected a whole number"),
        ("retries", "2", "steps[0].retries: expected a whole number"),
        ("retry_backoff", "2m", "steps[0].retry_backoff: at most 60s"),
        ("retry_backoff", "0s", "steps[0].retry_backoff: must be greater than zero"),
        ("retry_backoff", "soon", "steps[0].retry_backoff: 'soon' is not a duration"),
        ("on_interrupt", "retry", "steps[0].on_interrupt: 'retry' is not one of 'rerun', 'fail'"),
    ],
)
def test_retry_settings_errors_name_the_field(key: str, value: object, problem: str) -> None:
    data = valid()
    data["steps"][0][key] = value
    assert error_of(data).startswith(problem)


def test_retry_settings_round_trip_through_the_proto() -> None:
    data = valid()
    data["steps"][0].update(retries=4, retry_backoff="3s", on_interrupt="fail")
    spec = d.from_mapping(data)
    message = d.to_proto(spec)
    crawl = message.steps[0]
    assert crawl.retries == 4 and crawl.retry_backoff.ToSeconds() == 3
    assert crawl.on_interrupt == pb.ON_INTERRUPT_FAIL
    assert message.steps[1].on_interrupt == pb.ON_INTERRUPT_RERUN
    assert not message.steps[1].HasField("retry_backoff")
    assert d.from_proto(pb.JobDefinition.FromString(message.SerializeToString())) == spec


def test_unknown_on_interrupt_number_from_a_newer_client() -> None:
    message = pb.JobDefinition(
        name="j", steps=[pb.StepDefinition(name="a", type="command", on_interrupt=7)]
    )
    with pytest.raises(InvalidArgument, match=r"steps\[0\]\.on_interrupt: unknown OnInterrupt"):
        d.from_proto(message)


@pytest.mark.parametrize("name", ["nightly-crawl.toml", "demo.toml", "quick.toml"])
def test_the_stored_form_round_trips(name: str) -> None:
    """What is stored with the manager gives back the same job, through JSON."""
    spec = d.load_file(EXAMPLES / name, workers=WORKERS)
    stored = json.loads(json.dumps(d.to_mapping(spec)))
    assert d.from_mapping(stored, workers=WORKERS) == spec
