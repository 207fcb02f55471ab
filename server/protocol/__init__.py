"""OpenAI's wire types and error shape: what `api/` parses and renders and `serving/` builds, imported by both
and importing neither (no HTTP framework here)."""
