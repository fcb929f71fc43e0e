"""fedsim: a federated-learning simulator and deployment kit on Flower, PyTorch and Ray."""

__version__ = "0.1.0"
