"""``make demo``: the demo job end to end on the embedded default, in a few seconds.

Starts ``monitor-svc serve`` (SQLite in a temporary directory, a short grace period) and
``orchestrator-svc serve`` as subprocesses on free ports, waits until both report SERVING
through the gRPC health service, submits ``examples/demo.toml`` and shows its live progress
with the view of ``orchestrator-svc submit --follow`` (``orchestrator_svc.follow``), checks
that every step ended the way the job file says, and stops both services with SIGTERM.

Nothing is left running, whatever happens: the services are stopped in a ``finally`` on an
error, on Ctrl-C and on SIGTERM/SIGHUP to the demo, and on Linux they also get SIGTERM from the
kernel if the demo itself is killed (``PR_SET_PDEATHSIG``). They run in their own session, so
Ctrl-C reaches only the demo, which then stops them in order: orchestrator first (it flushes
its event stream to the monitor), then the monitor.

Exit status: 0 when the demo ran as designed -- the demo job fails on purpose in several ways,
so the check is that each step ended as designed, not that everything succeeded; 1 when a
step or the job ended otherwise; 2 when a service did not start or stop cleanly; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from grpc import aio
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from orchestrator_svc import definitions
from orchestrator_svc.demo_services import (
    HOST,
    ServiceError,
    ServiceProcess,
    free_port,
    start_service,
    stop_all,
    wait_serving,
)
from orchestrator_svc.follow import STYLE, follow, status_name
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.records import Job
from stepflow_common import logs, serving
from stepflow_common.errors import StepflowError
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_JOB = REPO_ROOT / "examples" / "demo.toml"
MONITOR_SERVICE = "stepflow.v1.MonitorService"
ORCHESTRATOR_SERVICE = "stepflow.v1.OrchestratorService"

GRACE_PERIOD = "2s"  # a handed-off step with no seal and no child ends this soon
SHUTDOWN_GRACE = "2s"  # what each service gives in-flight calls on SIGTERM
JOB_TIMEOUT_S = 60.0

EXIT_AS_DESIGNED = 0
EXIT_NOT_AS_DESIGNED = 1
EXIT_SERVICE_TROUBLE = 2
EXIT_INTERRUPTED = 130

# How each step of examples/demo.toml ends, and why: the failures are deliberate.
EXPECTED_STEPS: dict[str, tuple[str, str]] = {
    "crawl": ("completed", "6 of its 60 children fail (every 10th); they stay counted"),
    "enrich": ("completed", "wait = false: handed to the monitor, which ended it"),
    "thumbs": ("completed", "a fan-out over three items, one of which fails"),
    "broken": ("failed", "its command exits 3; on_error = continue: the job goes on"),
    "publish": ("skipped", "it depends on 'broken', which did not complete"),
    "report": ("completed", "it depends on 'crawl' only"),
}
EXPECTED_JOB_STATUS = "completed"  # every failure above was continued past

# --failover: two orchestrators; the owner is killed (SIGKILL) once this many of the first
# step's children have ended, and the other adopts the job when the owner's lease lapses.
FAILOVER_LEASE = "3s"
FAILOVER_ORPHAN_TIMEOUT = "1m"
FAILOVER_KILL_AFTER = 15
LOOK_S = 120.0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    logs.configure("console", "warning")
    # SIGTERM and SIGHUP end the demo as Ctrl-C does, so the `finally` below always runs
    # (SIGINT too, explicitly: a shell starting us in the background would have it ignored).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    services: list[ServiceProcess] = []
    with tempfile.TemporaryDirectory(prefix="stepflow-demo-") as tmp:
        try:
            code = _demo(args, console, Path(tmp), services)
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted: stopping the services[/]")
            code = EXIT_INTERRUPTED
        except ServiceError as exc:
            console.print(f"[red]demo: {escape(str(exc))}[/]")
            code = EXIT_SERVICE_TROUBLE
        except TimeoutError:
            console.print(f"[red]demo: the job did not end within {JOB_TIMEOUT_S:.0f}s[/]")
            code = EXIT_NOT_AS_DESIGNED
        except (grpc.RpcError, StepflowError) as exc:
            console.print(f"[red]demo: {escape(_describe(exc))}[/]")
            code = EXIT_SERVICE_TROUBLE
        finally:
            # Also on an unexpected exception, which then propagates with its traceback.
            clean = stop_all(services, console)
        return code if clean else EXIT_SERVICE_TROUBLE


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator_svc.demo",
        description="Run the demo job end to end: start the monitor (SQLite in a temporary "
        "directory) and the orchestrator, submit examples/demo.toml, show live per-step "
        "progress and the final step table, then stop both services. Exits 0 when every "
        "step ended as the demo designs it (some fail on purpose).",
    )
    parser.add_argument(
        "--job",
        type=Path,
        default=DEMO_JOB,
        help="job file to run instead (then only its reaching an end is checked) "
        f"[default: {DEMO_JOB.relative_to(REPO_ROOT)}]",
    )
    parser.add_argument(
        "--failover",
        action="store_true",
        help="run two orchestrators, kill the job's owner with SIGKILL mid-job, and show the "
        f"other one adopting and finishing it (lease {FAILOVER_LEASE})",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="the monitor's web view on this port [default: a free one]",
    )
    parser.add_argument(
        "--look",
        type=float,
        default=LOOK_S,
        help="in a terminal, seconds the services stay up after the job so its page can be "
        f"looked at (0: none) [default: {LOOK_S:.0f}]",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave both services up after the job (for grpcurl) until Ctrl-C",
    )
    return parser


def _demo(
    args: argparse.Namespace, console: Console, tmp: Path, services: list[ServiceProcess]
) -> int:
    job_file: Path = args.job
    if not job_file.is_file():
        raise ServiceError(f"no job file at {job_file} (run the demo from a clone of the repo)")
    database_url = f"sqlite:///{tmp / 'stepflow.db'}"
    web_port = args.http_port or free_port()
    console.print(f"[bold]stepflow demo[/]: {escape(str(job_file))}")

    python = [sys.executable, "-m"]
    common = ["--shutdown-grace", SHUTDOWN_GRACE, "--log-format", "json"]
    # Appended as soon as started: whatever happens next, the `finally` in main stops them.
    failover = ["--orphan-timeout", FAILOVER_ORPHAN_TIMEOUT] if args.failover else []
    services.append(start_service(
        "monitor",
        MONITOR_SERVICE,
        [*python, "monitor_svc", "serve", "--database-url", database_url,
         "--grace-period", GRACE_PERIOD, "--http-port", str(web_port), *failover, *common],
        tmp,
    ))  # fmt: skip
    monitor = services[-1]
    wait_serving(monitor)
    web = f"http://{HOST}:{web_port}"
    console.print(f"  monitor       {monitor.address}")
    console.print(f"  web view      {web}/", soft_wrap=True)
    console.print(f"  SQLite        {tmp / 'stepflow.db'}", soft_wrap=True)
    names = ["orchestrator-a", "orchestrator-b"] if args.failover else ["orchestrator"]
    for name in names:
        lease = ["--owner", name, "--lease", FAILOVER_LEASE] if args.failover else []
        serve = [*python, "orchestrator_svc", "serve", "--monitor", monitor.address]
        services.append(start_service(name, ORCHESTRATOR_SERVICE, [*serve, *lease, *common], tmp))
        wait_serving(services[-1])
        console.print(f"  {name:<13} {services[-1].address}")
    console.print()
    orchestrator = services[1]

    victim = orchestrator if args.failover else None
    final = asyncio.run(_run_job(job_file, orchestrator, monitor, console, web, kill=victim))
    if victim is not None:
        services.remove(victim)  # killed on purpose: not stopped again, not a failure
    if job_file.resolve() == DEMO_JOB:
        outcome = _check(final, console)
        if args.failover and outcome == EXIT_AS_DESIGNED:
            outcome = _check_failover(final, console)
    else:  # no design to hold it to: reaching an end is the whole check
        console.print(f"the job ended {status_name(final.status)}")
        outcome = EXIT_AS_DESIGNED
    for service in services:
        if service.process.poll() is not None:
            raise ServiceError(f"the {service.name} died during the demo:\n{service.log_tail()}")
    if args.keep_running:
        _keep_running(monitor, orchestrator, final, console, web)
    elif args.look > 0:
        _leave_time_to_look(final, console, web, args.look)
    return outcome


async def _run_job(
    job_file: Path,
    orchestrator: ServiceProcess,
    monitor: ServiceProcess,
    console: Console,
    web: str,
    *,
    kill: ServiceProcess | None = None,
) -> Job:
    """Submit the job and follow it, exactly as ``orchestrator-svc submit --follow`` does;
    with ``kill``, SIGKILL that orchestrator once the first step is well under way."""
    spec = definitions.load_file(str(job_file))
    security = serving.Security()
    async with serving.channel(orchestrator.address, security) as channel:
        response = await o_grpc.OrchestratorServiceStub(channel).SubmitJob(
            o.SubmitJobRequest(definition=definitions.to_proto(spec), request_id=uuid.uuid4().hex),
            timeout=30,
        )
    console.print(f"job page: {web}/jobs/{response.manager_id}\n", soft_wrap=True)
    async with serving.channel(monitor.address, security) as channel:
        client = MonitorClient(channel)
        killer = None
        if kill is not None:
            killer = asyncio.create_task(_kill_mid_job(client, response.manager_id, kill, console))
        try:
            return await asyncio.wait_for(
                follow(client.watch(response.manager_id), console), JOB_TIMEOUT_S
            )
        finally:
            if killer is not None:
                killer.cancel()


async def _kill_mid_job(
    client: MonitorClient, manager_id: str, victim: ServiceProcess, console: Console
) -> None:
    async for job in client.watch(manager_id):
        if job.step_stats:
            done = job.step_stats[0].children
            if done.completed + done.failed >= FAILOVER_KILL_AFTER:
                break
    victim.process.kill()
    victim.process.wait()
    console.print(
        f"[bold red]killed {victim.name}[/] (SIGKILL) with the job running: the other "
        f"orchestrator adopts it when the lease ({FAILOVER_LEASE}) lapses; its running "
        "children run again as their second attempt, each counted once"
    )


def _check_failover(job: Job, console: Console) -> int:
    if job.owner != "orchestrator-b":
        console.print(f"[red]not as designed: the job ended owned by {job.owner or 'no one'}[/]")
        return EXIT_NOT_AS_DESIGNED
    console.print(
        "[green]failover as designed:[/] orchestrator-b adopted the job from the killed "
        "orchestrator-a and finished it; the counts above are exact"
    )
    return EXIT_AS_DESIGNED


def _check(job: Job, console: Console) -> int:
    """Compare every step's end with the design; print why each ended as it did."""
    ended = {stat.step_name: status_name(stat.status) for stat in job.step_stats}
    surprises = []
    grid = Table.grid(padding=(0, 2, 0, 0))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()
    for name, (expected, why) in EXPECTED_STEPS.items():
        got = ended.get(name, "not started")
        # The status in its own colour (a failure is red even when it is the design); a
        # surprise is marked as such.
        if got == expected:
            grid.add_row(Text(name), _styled(got), Text(why))
        else:
            grid.add_row(
                Text(name),
                _styled(got),
                Text.assemble(("not as designed", "bold red"), f": expected {expected}; {why}"),
            )
            surprises.append(f"{name} ended {got}, not {expected}")
    console.print("\n[bold]why each step ended as it did[/]")
    console.print(Padding(grid, (0, 0, 0, 2)))
    job_status = status_name(job.status)
    if job_status != EXPECTED_JOB_STATUS:
        surprises.append(f"the job ended {job_status}, not {EXPECTED_JOB_STATUS}")
    if surprises:
        console.print(f"[red]not as designed: {escape('; '.join(surprises))}[/]")
        return EXIT_NOT_AS_DESIGNED
    console.print(
        f"[green]demo ran as designed:[/] the job ended {job_status}; the failures it "
        "continued past stay visible in step_stats"
    )
    return EXIT_AS_DESIGNED


def _styled(status: str) -> Text:
    return Text(status, style=STYLE.get(status, ""))


def _keep_running(
    monitor: ServiceProcess,
    orchestrator: ServiceProcess,
    job: Job,
    console: Console,
    web: str,
) -> None:
    console.print("\nboth services stay up until Ctrl-C; try, from the repository:")
    for hint in (
        f"  open {web}/jobs/{job.id}",
        f"  .venv/bin/grpcurl -plaintext {monitor.address} list",
        f'  .venv/bin/grpcurl -plaintext -d \'{{"job_id": "{job.id}"}}\' '
        f"{monitor.address} stepflow.v1.MonitorService/GetJob",
        f"  .venv/bin/grpcurl -plaintext {orchestrator.address} "
        "stepflow.v1.OrchestratorService/ListWorkers",
        f"  .venv/bin/orchestrator-svc logs {job.id} --monitor {monitor.address}",
    ):
        # Not wrapped by rich, so a command copied from the terminal stays one line.
        console.print(hint, markup=False, highlight=False, soft_wrap=True)
    try:
        while all(s.process.poll() is None for s in (monitor, orchestrator)):
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print()


def _leave_time_to_look(job: Job, console: Console, web: str, seconds: float) -> None:
    """In a terminal, the services stay up a while (Enter stops them sooner), so the page of
    the job that just ran can be opened; elsewhere (scripts, tests) the demo ends at once."""
    if not sys.stdin.isatty():
        return
    console.print(f"\nthe web view stays up for {seconds:.0f}s (Enter stops it now):")
    console.print(f"  {web}/jobs/{job.id}", soft_wrap=True)
    import select

    select.select([sys.stdin], [], [], seconds)


def exit_with(code: int) -> None:
    """Exit with ``code``; after Ctrl-C, die of SIGINT once everything is stopped, so a
    calling shell or make sees an interruption, not a failure."""
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
