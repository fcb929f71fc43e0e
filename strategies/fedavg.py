"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the cohort's local models."""

from fedsim.method import Method


class FedAvg(Method):
    """Plain local training on every client, the sample-weighted mean on the server: everything
    it does is the `Method` default."""

    name = "fedavg"
