"""The usage service: the gas gauge — exact, idempotent accounting and atomic budgets."""
