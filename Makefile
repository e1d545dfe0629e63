# Call-ingestion platform: `make setup && make up` to run it, `make test` to test it.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY        := .venv/bin/python
VERSITYGW := v1.8.0
export GOFLAGS := -mod=mod

.PHONY: help setup up down status test test-fast lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: .venv/.installed .tools/kafka/.installed .tools/bin/ferretdb .tools/versitygw-$(VERSITYGW) ## install everything (idempotent)
	@$(MAKE) --no-print-directory setup-extra
	@echo "setup complete"

.venv/.installed: pyproject.toml constraints.txt
	test -x .venv/bin/python || python3.11 -m venv .venv
	.venv/bin/pip install -q --upgrade pip==25.3
	.venv/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

.tools/kafka/.installed: deploy/kafka/pom.xml
	rm -rf .tools/kafka/libs
	cd deploy/kafka && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime \
	    -DoutputDirectory=$(CURDIR)/.tools/kafka/libs
	touch $@

.tools/bin/ferretdb: deploy/ferretdb/main.go deploy/ferretdb/go.mod deploy/ferretdb/go.sum
	mkdir -p .tools/bin
	cd deploy/ferretdb && go build -trimpath -o $(CURDIR)/.tools/bin/ferretdb .

.tools/versitygw-$(VERSITYGW):
	mkdir -p .tools/bin
	GOBIN=$(CURDIR)/.tools/bin go install github.com/versity/versitygw/cmd/versitygw@$(VERSITYGW)
	touch $@

up: setup-check ## start the whole stack detached; returns once every component is ready
	$(PY) -m tools.devstack up

down: ## stop everything `make up` started
	@test -x $(PY) && $(PY) -m tools.devstack down || true

status: ## show which components run
	@$(PY) -m tools.devstack status

setup-check:
	@test -f .venv/.installed -a -f .tools/kafka/.installed -a -x .tools/bin/ferretdb -a -x .tools/bin/versitygw \
	  || { echo "run 'make setup' first"; exit 1; }

lint: ## ruff and mypy
	.venv/bin/ruff check callingest services tools tests bench
	.venv/bin/mypy callingest services tools

test: setup-check lint ## the full suite against real servers (starts and stops what it needs)
	cd deploy/ferretdb && go test ./...
	.venv/bin/pytest -q

test-fast: setup-check ## the suite without slow tests
	.venv/bin/pytest -q -m 'not slow'

clean: down ## remove runtime state (keeps installed tools)
	rm -rf .run

setup-extra::
	@true

-include mk/*.mk
