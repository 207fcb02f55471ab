"""shrinkserve HTTP server: OpenAI schemas, routing, metrics, settings, engines."""
