"""Neural network modules of the world model and the actor-critic."""
