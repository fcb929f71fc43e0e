"""FedProx (Li et al., 2020): FedAvg whose clients add a proximal term (mu/2)||w - w_global||^2."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from strategies.fedavg import FedAvg


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.01, ge=0, description="weight of the proximal term")


class FedProx(FedAvg):
    """FedAvg plus a proximal term on every client, pulling local models toward the global."""

    name = "fedprox"
    Params = FedProxParams

    def client_config(self, server_round: int) -> dict[str, Any]:
        return {"objectives": {"proximal": {"mu": self.params.mu}}}
