"""The scheduler: the agent loop (observe -> decide -> act), its pure policy, state,
status, health probes, leader lock and operator requests."""
