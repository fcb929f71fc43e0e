"""Server side: one module per aggregation strategy, all on the fedsim base in `base.py`."""
