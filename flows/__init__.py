"""Prefect flows and the ``convcache`` command line that runs them.

The environment defaults below take effect when a ``convcache`` or ``python -m flows...`` entry
point starts, because those import this package before Prefect. A process that imports Prefect
first (a Prefect worker loading a deployment, say) reads its settings before these defaults.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")
# pipeline code also logs outside flow runs (for example while the CLI validates settings).
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Without PREFECT_API_URL a flow run starts a temporary local server, which would otherwise
# try to send anonymous usage data at startup.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
