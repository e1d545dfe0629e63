# syntax=docker/dockerfile:1
#
# One image for every callingest service. The Deployments run
# `command: ["callingest"]` with `args: ["serve", "<service>"]`; the default runs the gateway.
#
# Stage "build" owns the compilers and pip's caches; the final stage receives only the
# finished virtualenv, so no build tool reaches production.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# Build tools for any dependency that has no wheel for this platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is reused until constraints.txt or pyproject.toml change.
COPY constraints.txt pyproject.toml ./
COPY callingest ./callingest
COPY services ./services
RUN pip install -c constraints.txt .
# callingest.avro reads schemas/ beside the installed package (SCHEMA_DIR = <package>/../schemas).
COPY schemas /opt/venv/lib/python3.11/site-packages/schemas
RUN python -m compileall -q /opt/venv/lib/python3.11/site-packages \
    && callingest --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HTTP_HOST=0.0.0.0
RUN groupadd --system --gid 10001 callingest \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin callingest
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 8081 8082 8083 8084 8085
CMD ["callingest", "serve", "gateway"]
