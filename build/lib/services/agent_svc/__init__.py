"""The agent service: projects, agent types, agent instances and their lifecycle."""
