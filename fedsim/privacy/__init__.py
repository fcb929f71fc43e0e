"""Differential privacy: client-level DP-FedAvg (clipping on the clients, noise on the server)
and the accountant that turns its settings into epsilon."""
