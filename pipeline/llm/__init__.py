"""Model clients: one protocol, one implementation per wire protocol, resilience around it."""
