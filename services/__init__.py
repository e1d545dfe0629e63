"""Services of the call-ingestion platform: each package holds only its own step."""
