"""Every input limit, in one place. Checked before any write; a request past one gets
INVALID_ARGUMENT naming the field. (Message payloads: MAX_PAYLOAD_BYTES in the settings.)"""

from __future__ import annotations

# Whole requests
GRPC_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
HTTP_MAX_BODY_BYTES = 4 * 1024 * 1024

# Ids and text
MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 128
MAX_TITLE_LENGTH = 200  # titles, display names, owners
MAX_DESCRIPTION_LENGTH = 4096  # descriptions, tasks
MAX_REF_LENGTH = 1024  # references to outside storage (long_term_memory_ref)
MAX_REASON_LENGTH = 1000
MAX_PAYLOAD_TYPE_LENGTH = 64
MAX_MODEL_LENGTH = 200
MAX_SCHEMA_BYTES = 64 * 1024
MAX_MEMORY_BYTES = 64 * 1024
MAX_STRING_LENGTH = 64 * 1024  # any string field at all, checked before the handler runs
MAX_TIME_ZONE_LENGTH = 64  # IANA names are at most ~30
MAX_EVENT_TYPE_LENGTH = 64

# Lists
MAX_PAGE_SIZE = 100
MAX_PAGE_TOKEN_LENGTH = 1024
MAX_PEERS = 256
MAX_PARTICIPANTS = 64
MAX_BATCH_RECORDS = 1000

# Usage
MAX_TOKENS_PER_CALL = 100_000_000
MAX_LATENCY_MS = 3_600_000
MAX_COST_USD = 1_000_000.0
MAX_BUDGET_TOKENS = 10**12
MAX_BUDGET_COST_MICROS = 10**15  # a billion USD
MAX_BUDGET_REQUESTS = 10**12
MAX_IN_FLIGHT = 100_000  # reservations open at once at one budget's scope
MAX_THRESHOLDS = 10
MAX_URL_LENGTH = 2048
MAX_SERIES_BUCKETS = 1000
DEFAULT_RESERVATION_TTL_MS = 60_000
MAX_RESERVATION_TTL_MS = 3_600_000
