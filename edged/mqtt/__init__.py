"""MQTT: the link to the broker, its durable outbox, and what is published over it."""
