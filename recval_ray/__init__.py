"""recval_ray: value, prune and audit the training data of recommender systems, on Ray."""

__version__ = "0.1.0"
