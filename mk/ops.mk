# Operations targets: kustomize, rendering the Kubernetes overlays, the ops tests.
# Included by the root Makefile; `make setup` runs `$(MAKE) kustomize`.

KUSTOMIZE_VERSION ?= v5.8.2
TOOLS_BIN ?= $(CURDIR)/.tools/bin
KUSTOMIZE ?= $(TOOLS_BIN)/kustomize
K8S_OVERLAYS := dev prod
K8S_RENDER_DIR ?= build/k8s

.PHONY: kustomize render test-ops

# Installs the pinned kustomize from the Go module proxy into .tools/bin (idempotent:
# does nothing when that version is already there). kustomize v5.8.2 is built on
# sigs.k8s.io/kustomize/api v0.21.2 and needs Go >= 1.26.
kustomize:
	@if [ "$$($(KUSTOMIZE) version 2>/dev/null)" = "$(KUSTOMIZE_VERSION)" ]; then \
		echo "kustomize $(KUSTOMIZE_VERSION) already in $(TOOLS_BIN)"; \
	else \
		mkdir -p $(TOOLS_BIN) && \
		GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOBIN=$(TOOLS_BIN) \
			go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION) && \
		$(KUSTOMIZE) version; \
	fi

# Renders every overlay to $(K8S_RENDER_DIR)/<overlay>.yaml (what `kubectl apply -f` takes).
render: kustomize
	@mkdir -p $(K8S_RENDER_DIR)
	@for overlay in $(K8S_OVERLAYS); do \
		$(KUSTOMIZE) build deploy/k8s/overlays/$$overlay > $(K8S_RENDER_DIR)/$$overlay.yaml && \
		echo "rendered $(K8S_RENDER_DIR)/$$overlay.yaml"; \
	done

# The operations tests alone (manifests, alerts, dashboard, Dockerfile); part of `make test`.
test-ops: kustomize prometheus
	.venv/bin/pytest tests/system/ops

# `make setup` builds kustomize too (the manifest tests in `make test` need it).
setup-extra:: kustomize
