"""The engine: messages between server and workers, the round loop, and the backends."""
