"""Shared package: settings, Avro codec, Kafka producer and consumer loop, MongoDB access, metrics, logging."""
