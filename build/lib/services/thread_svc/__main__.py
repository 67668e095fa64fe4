"""`python -m services.thread_svc`"""

import sys

from services.common.server import main
from services.thread_svc.server import DEFAULT_METRICS_PORT, DEFAULT_PORT, create_server

sys.exit(main("thread_svc", DEFAULT_PORT, DEFAULT_METRICS_PORT, create_server))
