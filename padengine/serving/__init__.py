"""Serving: streaming detokenization, the asyncio engine, metrics and the OpenAI-compatible HTTP server."""
