"""Serving: the asyncio engine, metrics and the OpenAI-compatible HTTP server (detokenization is engine/)."""
