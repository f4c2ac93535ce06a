"""Runs one job: manager -> ordered steps -> children, recording everything in the monitor.

The rules (design §3): steps start in file order, each once the previous one has ended or been
handed off and every step it depends on has ended (a dependency that did not complete skips
it). ``wait = true`` steps are ended here, after their children's events are committed, with
the same final-status rule the monitor uses; ``wait = false`` steps are handed to the monitor
(``spawned``) and their end is learned from WatchJob, never by polling. ``on_error`` and the
error tolerance decide whether later steps start; the manager ends when every step is terminal.

Where each part lives (each imports only those listed after it):

- ``job``: the job's order, dependencies, drain, resume and end (``JobRunner``).
- ``step``: one step from its start to its end: start, worker, timeout, hand-off, seal.
- ``watch``: what the manager's WatchJob says: hand-off ends, API cancels, deadline, take-over.
- ``repairs``: events the monitor rejected, and what could not be recorded.
- ``children``: each child's transitions, counted and sent; the worker's ``StepContext``.
- ``context``: what the parts share: steps, stop, the fenced writes, a step's recorded end.
- ``stop``: why a job stops early and what it then ends as (pure).
- ``step_state``: one step's signals and its typed child tally (no I/O).
"""

from orchestrator_svc.runner.job import JobRunner

__all__ = ["JobRunner"]
