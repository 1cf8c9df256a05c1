"""Benchmarks: throughput, scalability (MTA vs OPPU), the pipeline on GPUs, driver memory."""
