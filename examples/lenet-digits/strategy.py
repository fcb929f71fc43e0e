"""A method of our own: the coordinate-wise trimmed mean of the clients' models (robust to a few
outlying clients). The client half is plain local training, so only the server half is here."""

import numpy as np
from pydantic import Field

from fedsim.method import Method, NoParams


class TrimmedMean(Method):
    """Per coordinate, drop the `trim` share of highest and lowest client values, average the rest."""

    name = "trimmed-mean"
    per_client_updates = True  # aggregate needs every client's model, not only their mean

    class Params(NoParams):
        trim: float = Field(0.1, ge=0, lt=0.5, description="share cut at each end")

    def aggregate(self, server_round, current, result):
        cut = int(self.params.trim * len(result.clients))
        new = {}
        for name, value in current.items():
            ordered = np.sort(result.stacked(name), axis=0)
            kept = ordered[cut:len(ordered) - cut]
            new[name] = kept.mean(axis=0).astype(value.dtype)
        return new, {"trimmed_clients": float(2 * cut)}
