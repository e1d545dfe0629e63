# PostgreSQL from Debian's packages: the store behind FerretDB (the default; not with STORE_BACKEND=sqlite)
# (tools/devstack.py runs a private cluster under .run/postgresql; docs/deployment.md).
# Included by the root Makefile; `make setup` runs `$(MAKE) postgresql`.

.PHONY: postgresql

# Idempotent and quick when a server is installed (one ls, no apt); otherwise installs the
# distribution's default version with apt-get (as root, as on CI). The package's own "main"
# cluster is not used: devstack runs its own data directory, port and user.
postgresql:
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		echo "postgresql: $$(ls -d /usr/lib/postgresql/*/bin/postgres | tail -1) already installed"; \
	else \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null && \
		ls /usr/lib/postgresql/*/bin/postgres; \
	fi

setup-extra:: postgresql
