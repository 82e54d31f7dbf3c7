"""Home Assistant MQTT discovery: the entities edged offers (entities.py), kept true on the
broker (discovery.py)."""
