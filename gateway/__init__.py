"""REST gateway (docs/api.md §3): routes from the protos' HTTP annotations, JSON and SSE."""
