"""The fleet simulator's parts (tools/fleet_sim.py is the command): simulated devices
(`device`, `worker`), cheap shared inference (`shared_model`), the broker, registry and
operator's view (`infra`) and the raw broker baseline (`raw`)."""
