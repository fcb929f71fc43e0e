"""FedProx (Li et al., 2020): FedAvg whose clients add a proximal term (mu/2)||w - w_global||^2."""

from pydantic import Field

from fedsim.method import NoParams
from fedsim.terms import Proximal
from strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg plus a proximal term on every client, pulling local models toward the global."""

    name = "fedprox"

    class Params(NoParams):
        mu: float = Field(0.01, ge=0, description="weight of the proximal term")

    def loss_terms(self, ctx):
        return [Proximal(Proximal.Params(mu=self.params.mu), ctx)]
