"""Client side: the local training loop, its composable objectives, and the worker runtime."""
