"""convcache library: images, conv bases, feature specs, the HDF5 feature store, heads and metrics.

Nothing in this package imports Prefect, so it can run in plain Python, notebooks and Dask workers.
"""

__version__ = "0.1.0"
