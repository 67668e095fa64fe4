"""The model gateway (SPEC §14): agents point the official `openai` / `anthropic` SDKs at
it, and every LLM call is admitted against the budgets and limits, forwarded, metered
from the provider's own usage figures and settled exactly once — with no cooperation
from the agent. `python -m gateway.models`, on MODEL_HTTP_PORT (8090)."""
