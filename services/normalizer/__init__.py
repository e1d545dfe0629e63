"""The normalizer service."""
