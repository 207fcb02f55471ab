"""Profiles: how each deployment is derived from a base, and building its artifact through the cache.

The pieces live in compression/spec.py (what a profile declares), compression/methods/ (one handler per
method) and compression/pipeline.py (the resolver); this module keeps the names the server imports.
"""

from shrinkserve.compression.pipeline import BuiltProfile, ProfileBuilder, ProfilePlan, ProfileStatus, resolve
from shrinkserve.compression.spec import BaseSpec, CalibrationSpec, ProfileSpec, QualityGate, Step

__all__ = [
    "BaseSpec",
    "BuiltProfile",
    "CalibrationSpec",
    "ProfileBuilder",
    "ProfilePlan",
    "ProfileSpec",
    "ProfileStatus",
    "QualityGate",
    "Step",
    "resolve",
]
