"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file is parsed and held against what the services really read: every environment
variable it sets must be one the `serve` command's argparse parser reads (and, set, must give
the value the file means), the addresses must line up (the monitor's port with the
orchestrator's --monitor, the database URL with PostgreSQL's credentials), and each gRPC
health check command is run against a live server, so a broken probe cannot hide behind a
container runtime that is not here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from monitor_svc import cli as monitor_cli
from monitor_svc.server import DEFAULT_HTTP_PORT
from orchestrator_svc import cli as orchestrator_cli
from orchestrator_svc.demo_services import ServiceProcess, free_port, start_service, wait_serving
from tests.process_helpers import PG_BIN

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BIN = Path(sys.executable).parent
MONITOR_PORT = 50051
WEB_PORT = DEFAULT_HTTP_PORT  # the monitor's web view
ORCHESTRATOR_PORT = 50052
MONITOR_SERVICE = "stepflow.v1.MonitorService"
ORCHESTRATOR_SERVICE = "stepflow.v1.OrchestratorService"
PROBE_TIMEOUT_S = 20.0
LOOPBACK = "127.0.0.1"
ENV_IN_HELP = re.compile(r"\[env: ([^;\]]+)")


# -- what the services read ------------------------------------------------------------------
def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[name]
            return sub
    raise AssertionError(f"{parser.prog} has no subcommands")


def env_vars_read(parser: argparse.ArgumentParser) -> set[str]:
    """Every environment variable a parser's flags read, as their --help states it (the
    helper that adds a flag writes the names it reads into the help)."""
    names: set[str] = set()
    for action in parser._actions:
        match = ENV_IN_HELP.search(action.help or "")
        if match:
            names.update(name.strip() for name in match.group(1).split(","))
    return names


def monitor_serve_parser() -> argparse.ArgumentParser:
    return _subparser(monitor_cli.build_parser(), "serve")


def orchestrator_serve_parser() -> argparse.ArgumentParser:
    return _subparser(orchestrator_cli.build_parser(), "serve")


def runner_parser() -> argparse.ArgumentParser:
    return _subparser(orchestrator_cli.build_parser(), "runner")


# -- the files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][name]
    return service


def _env(compose: dict[str, Any], name: str) -> dict[str, str]:
    env = _service(compose, name).get("environment", {})
    assert isinstance(env, dict), f"{name}: write environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def test_the_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "monitor", "orchestrator", "rabbitmq", "runner"}
    assert str(_service(compose, "postgres")["image"]).startswith("postgres:")
    assert str(_service(compose, "rabbitmq")["image"]).startswith("rabbitmq:")


@pytest.mark.parametrize("name", ["monitor", "orchestrator", "runner"])
def test_services_build_the_dockerfile(compose: dict[str, Any], name: str) -> None:
    service = _service(compose, name)
    assert service.get("image"), f"{name}: name the image so both services share one build"
    build = service.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    assert context == ".", f"{name}: build the repository's Dockerfile"
    assert (ROOT / context / "Dockerfile").is_file()
    command = service["command"]
    expected = {
        "monitor": ["monitor-svc", "serve"],
        "orchestrator": ["orchestrator-svc", "serve"],
        "runner": ["orchestrator-svc", "runner"],
    }[name]
    assert command[:2] == expected, command


@pytest.mark.parametrize(
    ("name", "port"),
    [("monitor", MONITOR_PORT), ("monitor", WEB_PORT), ("orchestrator", ORCHESTRATOR_PORT)],
)
def test_ports_are_published(compose: dict[str, Any], name: str, port: int) -> None:
    ports = [str(p) for p in _service(compose, name)["ports"]]
    assert f"{LOOPBACK}:{port}:{port}" in ports, ports


@pytest.mark.parametrize("name", ["postgres", "monitor", "orchestrator", "rabbitmq", "runner"])
def test_ports_stay_on_loopback_unless_a_token_is_required(
    compose: dict[str, Any], name: str
) -> None:
    """A published port on every interface with no token would be open to the network."""
    env = _env(compose, name)
    has_token = any(key.endswith("_AUTH_TOKEN") and value for key, value in env.items())
    for published in _service(compose, name).get("ports", []):
        host_ip = str(published).rsplit(":", 2)[0] if str(published).count(":") == 2 else ""
        assert host_ip == LOOPBACK or has_token, f"{name} publishes {published} to every host"


@pytest.mark.parametrize("name", ["postgres", "monitor", "orchestrator", "rabbitmq", "runner"])
def test_services_restart_and_reap(compose: dict[str, Any], name: str) -> None:
    service = _service(compose, name)
    assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
    if name not in ("postgres", "rabbitmq"):
        # Orchestrators and runners run steps' shell commands: PID 1 must reap what they leave.
        assert service.get("init") is True, f"{name}: init: true"


def test_volumes_are_named_and_used(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            assert ":" in str(volume) and not source.startswith(("/", ".")), (
                f"{name}: {volume} is not a named volume"
            )
            used.add(source)
    assert used == declared, f"declared {sorted(declared)}, used {sorted(used)}"
    # A VOLUME in the image would give every container an anonymous volume, used or not.
    assert not [args for keyword, args in _dockerfile_instructions() if keyword == "VOLUME"]


def test_one_postgresql_version_everywhere(compose: dict[str, Any]) -> None:
    """compose runs the PostgreSQL major version the tests (and CI) run on."""
    image = str(_service(compose, "postgres")["image"])
    tag = image.partition(":")[2]
    tests_version = PG_BIN.parent.name  # /usr/lib/postgresql/<major>/bin
    assert tag.split(".")[0] == tests_version, (image, PG_BIN)
    assert f"PG_VERSION={tests_version}\n" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"PostgreSQL {tests_version}" in readme
    assert not re.findall(rf"postgres(?:ql)?:? ?(?!{tests_version}\b)1\d\b", readme, re.I)


@pytest.mark.parametrize(
    ("name", "parser_factory"),
    [
        ("monitor", monitor_serve_parser),
        ("orchestrator", orchestrator_serve_parser),
        ("runner", runner_parser),
    ],
)
def test_every_environment_variable_is_read(
    compose: dict[str, Any], name: str, parser_factory: Any
) -> None:
    read = env_vars_read(parser_factory())
    unknown = sorted(set(_env(compose, name)) - read)
    assert not unknown, f"{name} sets variables its command does not read: {unknown}"


def test_monitor_environment_takes_effect(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(compose, "monitor")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = monitor_serve_parser().parse_args([])
    assert args.host == "0.0.0.0"
    assert args.port == MONITOR_PORT
    assert args.metrics_port > 0
    assert args.log_format == "json"
    url = make_url(args.database_url)
    postgres = _env(compose, "postgres")
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgres"
    assert (url.username, url.password, url.database) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    assert f"{LOOPBACK}:{args.metrics_port}:{args.metrics_port}" in [
        str(p) for p in _service(compose, "monitor")["ports"]
    ]


def test_orchestrator_environment_takes_effect(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in _env(compose, "orchestrator").items():
        monkeypatch.setenv(key, value)
    args = orchestrator_serve_parser().parse_args([])
    assert args.host == "0.0.0.0"
    assert args.port == ORCHESTRATOR_PORT
    monitor_port = _env(compose, "monitor")["STEPFLOW_MONITOR_PORT"]
    assert args.monitor == f"monitor:{monitor_port}"
    assert args.owner, "a stable owner lets a restarted orchestrator resume its jobs"
    assert args.metrics_port > 0
    assert f"{LOOPBACK}:{args.metrics_port}:{args.metrics_port}" in [
        str(p) for p in _service(compose, "orchestrator")["ports"]
    ]


def test_start_order_waits_for_health(compose: dict[str, Any]) -> None:
    assert _service(compose, "monitor")["depends_on"] == {
        "postgres": {"condition": "service_healthy"}
    }
    assert _service(compose, "orchestrator")["depends_on"] == {
        "monitor": {"condition": "service_healthy"},
        "rabbitmq": {"condition": "service_healthy"},
    }
    for name in ("postgres", "monitor", "orchestrator", "rabbitmq"):
        assert _service(compose, name).get("healthcheck", {}).get("test"), f"{name}: no healthcheck"


def _probe(compose: dict[str, Any], name: str) -> list[str]:
    test = _service(compose, name)["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python", f"{name}: the probe runs python: {test}"
    return [str(part) for part in test[1:]]


@pytest.mark.parametrize(
    ("name", "port", "grpc_service"),
    [
        ("monitor", MONITOR_PORT, MONITOR_SERVICE),
        ("orchestrator", ORCHESTRATOR_PORT, ORCHESTRATOR_SERVICE),
    ],
)
def test_health_probe_asks_the_grpc_health_service(
    compose: dict[str, Any], name: str, port: int, grpc_service: str
) -> None:
    script = _probe(compose, name)[-1]
    assert "grpc_health" in script
    assert f"127.0.0.1:{port}" in script
    assert f"'{grpc_service}'" in script


@pytest.fixture(scope="module")
def live_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    tmp = tmp_path_factory.mktemp("compose")
    common = ["--shutdown-grace", "2s", "--log-format", "json"]
    started: dict[str, ServiceProcess] = {}
    try:
        started["monitor"] = start_service(
            "monitor",
            MONITOR_SERVICE,
            [str(BIN / "monitor-svc"), "serve", "--database-url", f"sqlite:///{tmp / 'c.db'}",
             "--http-port", "0", *common],
            tmp,
        )  # fmt: skip
        wait_serving(started["monitor"])
        started["orchestrator"] = start_service(
            "orchestrator",
            ORCHESTRATOR_SERVICE,
            [str(BIN / "orchestrator-svc"), "serve", "--monitor", started["monitor"].address,
             *common],
            tmp,
        )  # fmt: skip
        wait_serving(started["orchestrator"])
        yield started
    finally:
        for service in reversed(started.values()):
            service.stop()


@pytest.mark.parametrize(
    ("name", "port"), [("monitor", MONITOR_PORT), ("orchestrator", ORCHESTRATOR_PORT)]
)
def test_health_probe_runs(
    compose: dict[str, Any], live_services: dict[str, ServiceProcess], name: str, port: int
) -> None:
    """The probe, pointed at a live server, says healthy; pointed at nothing, unhealthy."""
    python, *rest = _probe(compose, name)
    assert python == "python"
    live = [
        sys.executable,
        *rest[:-1],
        rest[-1].replace(f"127.0.0.1:{port}", live_services[name].address),
    ]
    done = subprocess.run(
        live, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{name} probe failed against a live server:\n{done.stderr}"

    nowhere = rest[-1].replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    dead = subprocess.run(
        [sys.executable, *rest[:-1], nowhere],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    assert dead.returncode != 0, f"{name} probe passed with no server listening"


# -- the Dockerfile ----------------------------------------------------------------------------
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_package() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"pip install (--no-deps )?\.(\s|$)", runs), runs
    copied = {  # every COPY source (all but the last argument)
        part.rstrip("/")
        for keyword, args in instructions
        if keyword == "COPY"
        for part in args.split()[:-1]
    }
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"include = \[([^\]]*)\]", pyproject)
    assert packages, "pyproject.toml: [tool.setuptools.packages.find] include not found"
    for pattern in re.findall(r'"([^"]+)"', packages.group(1)):
        package = pattern.rstrip("*")
        assert package in copied, f"the Dockerfile does not COPY the package {package}"
    assert {"pyproject.toml", "README.md"} <= copied  # pyproject's readme is README.md
    exposed = " ".join(args for keyword, args in instructions if keyword == "EXPOSE").split()
    assert {str(MONITOR_PORT), str(ORCHESTRATOR_PORT)} <= set(exposed)


def test_dockerfile_installs_dependencies_before_the_code() -> None:
    """A layer with the dependencies alone, built from pyproject.toml before any code is
    copied, so a code change does not reinstall them."""
    instructions = _dockerfile_instructions()
    deps = next(
        i for i, (keyword, args) in enumerate(instructions)
        if keyword == "RUN" and "pip install" in args and "pyproject.toml" in args
    )  # fmt: skip
    copied_before = [args.split()[:-1] for kw, args in instructions[:deps] if kw == "COPY"]
    assert copied_before == [["pyproject.toml"]], copied_before
    after = " ".join(args for keyword, args in instructions[deps:] if keyword in ("COPY", "RUN"))
    for package in ("stepflow_proto", "stepflow_common", "monitor_svc", "orchestrator_svc"):
        assert package in after
    assert "pip install --no-deps ." in after, after


def test_dockerfile_environment_is_read() -> None:
    read = env_vars_read(monitor_serve_parser()) | env_vars_read(orchestrator_serve_parser())
    names = set()
    for keyword, args in _dockerfile_instructions():
        if keyword == "ENV":
            names.update(re.findall(r"(\w+)=", args))
    stepflow = {name for name in names if name.startswith("STEPFLOW_")}
    assert stepflow, "the Dockerfile sets no STEPFLOW_ variables"
    assert not stepflow - read, f"not read by either service: {sorted(stepflow - read)}"


def test_dockerignore_keeps_what_the_image_needs() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = {"pyproject.toml", "README.md", "stepflow_proto", "stepflow_common", "monitor_svc",
              "orchestrator_svc", "examples"}  # fmt: skip
    assert not needed & ignored
    assert {".venv", ".git"} <= ignored


def test_orchestrators_and_runners_share_the_broker(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orchestrator publishes where the runner takes, as the broker's own user, and the
    runner reports to the monitor."""
    rabbit = _env(compose, "rabbitmq")
    urls = []
    for name, parser_factory in (
        ("orchestrator", orchestrator_serve_parser),
        ("runner", runner_parser),
    ):
        with monkeypatch.context() as patch:
            for key, value in _env(compose, name).items():
                patch.setenv(key, value)
            args = parser_factory().parse_args([])
        urls.append(args.broker_url)
        if name == "runner":
            monitor_port = _env(compose, "monitor")["STEPFLOW_MONITOR_PORT"]
            assert args.monitor == f"monitor:{monitor_port}"
            assert args.concurrency >= 1
    assert urls[0] == urls[1], urls
    url = make_url(urls[0].replace("amqp://", "postgresql://", 1))  # the URL's parts only
    assert (url.username, url.password, url.host) == (
        rabbit["RABBITMQ_DEFAULT_USER"],
        rabbit["RABBITMQ_DEFAULT_PASS"],
        "rabbitmq",
    )
    for name in ("orchestrator", "runner"):
        assert _service(compose, name)["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
