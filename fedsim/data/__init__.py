"""Datasets, partitions and the federation of virtual clients built from them."""
