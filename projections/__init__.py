"""Projections: folds of the event log into read tables, and the worker that runs them."""
