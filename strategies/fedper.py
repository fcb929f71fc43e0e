"""FedPer (Arivazhagan et al., 2019): a shared body and a personal head per client.

Client: trains the whole model from the global body and its own head (the global head before
its first round), keeps the head and sends only the body. Server: the sample-weighted mean of
the bodies. The global model's head is never trained by anyone, so the generic model's accuracy
means little here; the personal model (global body, own head) is what FedPer is for.
"""

from torch import nn

from fedsim.personal import LocalLayers, head_keys


class FedPer(LocalLayers):
    """Local head (the model's last nn.Linear), shared body."""

    name = "fedper"

    def local_keys(self, model: nn.Module) -> list[str]:
        return head_keys(model)
