"""Published numbers a comparison targets, shown in the report beside the measured ones.

A comparison spec states them in `[compare.published]`:

    [compare.published]
    source = "Li et al., ICLR 2020, Table 2: FedProx Synthetic(1,1), 30 clients"
    metric = "final accuracy"              # a column of the report's summary table
    [[compare.published.values]]
    variant = "fedprox"
    level = "alpha=0.1"                    # the report's level label; leave out for every level
    value = 0.853                          # accuracies as fractions, like the runs' tables

`fedsim compare` checks them before any cell runs and keeps them as `published.json` in the
comparison folder, so `fedsim report` shows them for any past comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from fedsim.errors import ConfigError

FILE = "published.json"
METRICS = ("final accuracy", "best accuracy", "rounds to target", "client acc. mean", "client acc. std",
           "client acc. worst 10%", "MB exchanged", "wall seconds")


class PublishedValue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: str
    level: str | None = None
    value: float


class Published(BaseModel):
    """What a comparison targets: where the numbers come from, which metric, the numbers."""

    model_config = ConfigDict(extra="forbid")

    source: str
    metric: str = "final accuracy"
    values: list[PublishedValue]

    def model_post_init(self, context: object) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric '{self.metric}' is not a summary column; one of: {', '.join(METRICS)}")


def parse_published(raw: object, variants: list[str]) -> Published:
    """`[compare.published]` checked: its keys, its metric, and variants the comparison has."""
    try:
        published = Published.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"compare.published{'.' + where if where else ''}: {first['msg']}") from None
    unknown = sorted({v.variant for v in published.values} - set(variants))
    if unknown:
        raise ConfigError(f"compare.published names variant(s) {unknown} the comparison does not "
                          f"have; its variants: {', '.join(variants)}")
    return published


def save_published(folder: Path, published: Published) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FILE).write_text(published.model_dump_json(indent=2))


def load_published(paths: list[Path]) -> list[Published]:
    return [Published.model_validate(json.loads((Path(p) / FILE).read_text()))
            for p in paths if (Path(p) / FILE).is_file()]


def with_published(table: pd.DataFrame, published: list[Published]) -> pd.DataFrame:
    """The summary table with, per published metric, a `published <metric>` column and the gap
    `<metric> gap (stds)`: (measured mean - published) / the seed-to-seed std of the measured.
    Several comparisons (one list each) may publish the same metric: each fills its own rows."""
    for target in published:
        column = f"published {target.metric}"
        values = []
        for _, row in table.iterrows():
            matches = [v.value for v in target.values
                       if v.variant == row["variant"] and v.level in (None, row["level"])]
            values.append(matches[-1] if matches else np.nan)
        found = pd.Series(values, index=table.index, dtype=float)
        table[column] = found.combine_first(table[column]) if column in table else found
        std = table[f"{target.metric} std"].where(table[f"{target.metric} std"] > 0)
        table[f"{target.metric} gap (stds)"] = (table[f"{target.metric} mean"] - table[column]) / std
    return table
