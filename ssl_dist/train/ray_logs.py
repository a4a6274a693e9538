"""Worker-process set-up of a local Ray instance (``runtime_env["worker_process_setup_hook"]``).

Kept free of heavy imports: every worker process of the instance runs it at start.
"""

from __future__ import annotations

import logging

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
SETUP_HOOK = f"{__name__}.quiet_placement_group_cleaner"
"""What :func:`ssl_dist.train.driver.connect` passes as the hook of a local instance."""


def quiet_placement_group_cleaner() -> None:
    """Ray Train's placement-group cleaner asks the State API once a second whether the
    controller still lives; a local instance started without the dashboard has no State API, so
    every check logs a warning (one line a second in the run's log). Only its errors pass."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
