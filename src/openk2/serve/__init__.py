"""Serving (spec §1, §4): the generation engine, sampling, continuous batching and the served-model loader.

The HTTP server is `openk2.serve.app.create_app` (imported on its own: it pulls in FastAPI).
"""

from openk2.serve.engine import Completion, Engine, LatentCache
from openk2.serve.loading import ServedModel, load_served_model
from openk2.serve.sampling import SamplingParams
from openk2.serve.scheduler import Scheduler, StepOutput

__all__ = ["Completion", "Engine", "LatentCache", "SamplingParams", "Scheduler", "ServedModel", "StepOutput",
           "load_served_model"]
