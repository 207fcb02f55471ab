"""Compression: profiles, quantizers, artifact cache, evaluation."""
