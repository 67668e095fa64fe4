"""The thread service: conversations between agents, operator injection, inbox delivery."""
