"""REST gateway (SPEC §3): routes from the protos' HTTP annotations, JSON and SSE."""
