"""Entry points for `ray job submit` (one module per job); added with the Ray pipeline."""
