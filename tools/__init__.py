"""Developer tools: the dev/test stack manager and the SMTP sink."""
