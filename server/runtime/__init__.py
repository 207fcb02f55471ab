"""Between a GenerationRequest and a model: decode state, schedulers (cores), profiles; no HTTP."""
