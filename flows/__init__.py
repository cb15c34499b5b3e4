"""Prefect flows and the ``convcache`` command line that runs them."""
