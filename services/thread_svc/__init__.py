"""The thread service (see SPEC §2); implemented by its own issue."""
