"""`python -m services.agent_svc`"""

import sys

from services.agent_svc.server import DEFAULT_METRICS_PORT, DEFAULT_PORT, create_server
from services.common.server import main

sys.exit(main("agent_svc", DEFAULT_PORT, DEFAULT_METRICS_PORT, create_server))
