# Observability targets: Prometheus and promtool (issue 14).
# Included by the root Makefile; `make setup` runs `$(MAKE) prometheus`; `make up` runs the
# Prometheus built here (tools/devstack.py, configuration from tools/prometheus.py).

PROMETHEUS_VERSION ?= v0.316.0
PROMETHEUS_BIN ?= $(CURDIR)/.tools/bin

.PHONY: prometheus check-rules

# Builds the pinned prometheus and promtool from the Go module proxy into .tools/bin
# (idempotent: a stamp file records the version built; the Prometheus module carries both
# commands). The web UI's assets are not embedded in a module-proxy build; the HTTP API
# (/api/v1/...) is complete without them.
prometheus: .tools/prometheus-$(PROMETHEUS_VERSION)

.tools/prometheus-$(PROMETHEUS_VERSION):
	mkdir -p $(PROMETHEUS_BIN)
	GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOBIN=$(PROMETHEUS_BIN) \
		go install github.com/prometheus/prometheus/cmd/prometheus@$(PROMETHEUS_VERSION) \
		github.com/prometheus/prometheus/cmd/promtool@$(PROMETHEUS_VERSION)
	touch $@

# promtool check rules + promtool test rules (tests/system/ops/promtool) on the rule file generated from
# the PrometheusRule, in build/prometheus; `make test` runs the same through tests/system/ops/test_ops_rules.py.
check-rules: prometheus ## promtool check rules and the promtool unit tests of the alerts
	$(PY) -m tools.prometheus check

setup-extra:: prometheus
