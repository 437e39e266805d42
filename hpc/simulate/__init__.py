"""The fleet simulator: the agent's real scaling policy (and a baseline) in simulated time."""
