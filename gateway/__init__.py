"""REST gateway (SPEC §3); implemented by its own issue."""
