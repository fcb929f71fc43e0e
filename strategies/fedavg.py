"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the cohort's local models."""

from strategies.base import FedsimStrategy


class FedAvg(FedsimStrategy):
    """Plain federated averaging; everything it does is the base's default."""

    name = "fedavg"
