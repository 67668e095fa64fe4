"""`python -m services.usage_svc`"""

import sys

from services.common.server import main
from services.usage_svc.server import DEFAULT_METRICS_PORT, DEFAULT_PORT, create_server

sys.exit(main("usage_svc", DEFAULT_PORT, DEFAULT_METRICS_PORT, create_server))
