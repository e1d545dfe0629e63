# Reliability targets (issue 6; about 5 min). `make test` already runs tests/system/fault, tests/system/security and a
# 60-second tests/system/soak; these run the long ones.
#   make reliability          tests_reliability/: Kafka, MongoDB and S3 outages, kill -9 of each
#                             consumer with 200 calls in flight, schemathesis (>= 2,000 cases),
#                             and on a 3-broker KRaft cluster (tools/kafka_cluster.py, RF 3,
#                             min.insync.replicas 2) with 500 calls each: kill -9 of the busiest
#                             leader, 3 instances per consumer with kill -9 + add, rolling restart.
#                             RELIABILITY_KAFKA_PORTS / RELIABILITY_CONTROLLER_PORTS pin its ports.
#   make soak DURATION=600    steady load for DURATION seconds (default 600) with memory samples
# Figures land in .run/reliability/*.json (see docs/reliability.md).

DURATION ?= 600
SOAK_RATE ?= 4

.PHONY: reliability soak

reliability: setup-check ## long fault tests: outages, consumer kills, schemathesis, 3-broker cluster runs
	.venv/bin/pytest -q -s tests_reliability

soak: setup-check ## steady load through the pipeline for DURATION seconds (default 600)
	SOAK_SECONDS=$(DURATION) SOAK_RATE=$(SOAK_RATE) .venv/bin/pytest -q -s tests/system/soak
