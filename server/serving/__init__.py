"""Between OpenAI protocol types and runtime generation requests/steps; no engine code, no HTTP objects."""
