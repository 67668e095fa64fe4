"""`python -m services.agent_svc`"""

import sys

from services.agent_svc.server import create_server
from services.common import registry
from services.common.server import main

sys.exit(main(registry.AGENT, create_server))
