"""mta_ray: Merge-then-Adapt personalisation of a large language model for every user, on Ray."""

__version__ = "0.1.0"
