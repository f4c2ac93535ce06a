# One image for both services; docker-compose.yml picks the command (monitor-svc serve or
# orchestrator-svc serve). Build: docker build -t stepflow .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package and nothing else (.dockerignore keeps .venv, databases and caches out).
COPY pyproject.toml README.md ./
COPY stepflow_proto/ stepflow_proto/
COPY stepflow_common/ stepflow_common/
COPY monitor_svc/ monitor_svc/
COPY orchestrator_svc/ orchestrator_svc/
RUN pip install . \
    && useradd --system --uid 10001 --user-group --home-dir /data --create-home stepflow

COPY examples/ examples/

# Every flag reads STEPFLOW_<COMMAND>_<FLAG>: in a container the servers listen on all
# interfaces, and the monitor's embedded default (SQLite) lives on the /data volume.
# docker-compose.yml sets STEPFLOW_DATABASE_URL to its PostgreSQL instead.
ENV STEPFLOW_MONITOR_HOST=0.0.0.0 \
    STEPFLOW_ORCHESTRATOR_HOST=0.0.0.0 \
    STEPFLOW_DATABASE_URL=sqlite:////data/stepflow.db

USER stepflow
VOLUME ["/data"]
EXPOSE 50051 50052

# SIGTERM (docker stop) shuts either service down gracefully.
CMD ["monitor-svc", "serve"]
