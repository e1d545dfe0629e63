"""Typed application keys of the gateway's resources (opened in ``cleanup_ctx``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from callingest.kafka import Producer
from callingest.settings import Settings
from services.gateway.auth import FailureThrottle, TokenAuthenticator
from services.gateway.calls import CallService
from services.gateway.publisher import CallPublisher
from services.gateway.writer import CallWriter

SETTINGS = web.AppKey("settings", Settings)
MONGO_CLIENT = web.AppKey("mongo_client", AsyncMongoClient)
DB = web.AppKey("db", AsyncDatabase)
WRITER = web.AppKey("writer", CallWriter)
PRODUCER = web.AppKey("producer", Producer)
PUBLISHER = web.AppKey("publisher", CallPublisher)
AUTHENTICATOR = web.AppKey("authenticator", TokenAuthenticator)
AUTH_THROTTLE = web.AppKey("auth_throttle", FailureThrottle)
CALL_SERVICE = web.AppKey("call_service", CallService)
S3_CLIENT: web.AppKey[Any] = web.AppKey("s3_client")  # aiobotocore generates its class
OPENAPI = web.AppKey("openapi", dict)
SCANS_UNPUBLISHED = web.AppKey("scans_unpublished", bool)  # this process runs the republisher's scans
