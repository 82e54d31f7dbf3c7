"""The central model registry (`edged-registry`): publishes signed releases over MQTT
and serves their files in chunks. See docs/registry.md and docs/updates.md."""
