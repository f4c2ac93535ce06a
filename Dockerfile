# One image for both services; docker-compose.yml picks the command (monitor-svc serve or
# orchestrator-svc serve). Build: docker build -t stepflow .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home stepflow

# The dependencies in a layer of their own, from pyproject.toml alone: a change to the code
# reuses it; only a change to the dependencies installs them again.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package and nothing else (.dockerignore keeps .venv, databases and caches out).
COPY README.md ./
COPY stepflow_proto/ stepflow_proto/
COPY stepflow_common/ stepflow_common/
COPY stepflow_client/ stepflow_client/
COPY monitor_svc/ monitor_svc/
COPY orchestrator_svc/ orchestrator_svc/
RUN pip install --no-deps .

COPY examples/ examples/

# Every flag reads STEPFLOW_<COMMAND>_<FLAG>: in a container the servers listen on all
# interfaces (docker-compose.yml publishes them on the host's loopback only), and the
# monitor's embedded default (SQLite) lives in /data: mount a volume there to keep it
# (docker run -v stepflow-data:/data ...). docker-compose.yml uses PostgreSQL instead.
ENV STEPFLOW_MONITOR_HOST=0.0.0.0 \
    STEPFLOW_ORCHESTRATOR_HOST=0.0.0.0 \
    STEPFLOW_DATABASE_URL=sqlite:////data/stepflow.db

USER stepflow
EXPOSE 50051 50052

# SIGTERM (docker stop) shuts either service down gracefully.
CMD ["monitor-svc", "serve"]
