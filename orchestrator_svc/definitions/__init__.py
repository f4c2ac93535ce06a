"""Job definitions: the validated, plain form of a job file (TOML or JSON) or of SubmitJob's
``JobDefinition``.

Everything is checked here, before anything runs: a job that starts has a well-formed
definition, depends only on earlier steps (so there are no cycles), and, given the workers,
only names registered step types whose configs those workers accept. Every error is an
InvalidArgument whose message starts with the field, e.g.
``steps[1].depends_on: 'crawl' is not an earlier step``.
"""

from orchestrator_svc.definitions.fields import validate_config, validate_steps
from orchestrator_svc.definitions.mapping import from_mapping, load_file, to_mapping
from orchestrator_svc.definitions.proto import from_proto, to_proto
from orchestrator_svc.definitions.spec import (
    DEFAULT_RETRY_BACKOFF_S,
    MAX_CONFIG_DEPTH,
    MAX_EXACT_INT,
    MAX_RETRIES,
    MAX_STEPS,
    Executor,
    JobSpec,
    OnError,
    OnInterrupt,
    StepSpec,
    ToleranceAction,
    ToleranceSpec,
)
from stepflow_common.limits import MAX_NAME_CHARS

__all__ = [
    "DEFAULT_RETRY_BACKOFF_S",
    "MAX_CONFIG_DEPTH",
    "MAX_EXACT_INT",
    "MAX_NAME_CHARS",
    "MAX_RETRIES",
    "MAX_STEPS",
    "Executor",
    "JobSpec",
    "OnError",
    "OnInterrupt",
    "StepSpec",
    "ToleranceAction",
    "ToleranceSpec",
    "from_mapping",
    "from_proto",
    "load_file",
    "to_mapping",
    "to_proto",
    "validate_config",
    "validate_steps",
]
