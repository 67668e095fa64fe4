"""`python -m services.thread_svc`"""

import sys

from services.common import registry
from services.common.server import main
from services.thread_svc.server import create_server

sys.exit(main(registry.THREAD, create_server))
