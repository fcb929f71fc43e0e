"""Running an experiment on real clients: Flower's Deployment Engine (SuperLink, SuperNodes)."""
