"""A step load: add SHELFSIGHT_STEP_USERS users every SHELFSIGHT_STEP_SECONDS, up to
SHELFSIGHT_STEP_MAX_USERS, for SHELFSIGHT_STEP_DURATION seconds in all. Passed to Locust beside the
locustfile (`-f loadtest/locustfile.py,loadtest/shapes.py`) only when a step shape is wanted."""
from __future__ import annotations

import os

from locust import LoadTestShape


class StepLoadShape(LoadTestShape):
    step_users = int(os.environ.get("SHELFSIGHT_STEP_USERS", "2"))
    step_seconds = float(os.environ.get("SHELFSIGHT_STEP_SECONDS", "10"))
    max_users = int(os.environ.get("SHELFSIGHT_STEP_MAX_USERS", "8"))
    duration = float(os.environ.get("SHELFSIGHT_STEP_DURATION", "60"))

    def tick(self):
        elapsed = self.get_run_time()
        if elapsed >= self.duration:
            return None
        users = min(self.max_users, self.step_users * (int(elapsed // self.step_seconds) + 1))
        return users, max(1.0, float(self.step_users))
