"""Helpers shipped with the package for tests and benchmark scripts (like ``numpy.testing``).

Nothing here is a backend: `backends.get_service_client` does not know these classes and no run
parameter selects them. `SimulatedService` wraps the local engine's service client so that a
test or a bench can count what a loop costs on the remote service (clock cycles, sampling
slots) while every number still comes from the local engine.
"""

from .simulated_service import (
    SimulatedClock,
    SimulatedEvent,
    SimulatedFuture,
    SimulatedSamplingClient,
    SimulatedService,
    SimulatedTrainingClient,
)

__all__ = [
    "SimulatedClock",
    "SimulatedEvent",
    "SimulatedFuture",
    "SimulatedSamplingClient",
    "SimulatedService",
    "SimulatedTrainingClient",
]
