"""The webhooks deliverer: call outcomes POSTed to the clients ' own endpoints."""
