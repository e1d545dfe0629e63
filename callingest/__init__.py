"""Shared package of the call-ingestion platform.

Settings, the Avro codec, the Kafka producer and consumer loop, MongoDB and S3
access, metrics and logging: everything two services need, written once.
"""
