"""`python -m services.usage_svc`"""

import sys

from services.common import registry
from services.common.server import main
from services.usage_svc.server import create_server

sys.exit(main(registry.USAGE, create_server))
