"""What every router reaches through `app.state.services`: the process-wide objects of one app."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from shrinkserve.server.lifecycle import Lifecycle
from shrinkserve.server.runtime.metrics import Metrics
from shrinkserve.server.runtime.registry import Registry
from shrinkserve.server.settings import Settings


@dataclass
class Services:
    settings: Settings
    registry: Registry
    metrics: Metrics
    lifecycle: Lifecycle
    started: int  # unix time, the `created` of every model card


def services(request: Request) -> Services:
    return request.app.state.services
