"""Benchmarks on datasets: engines (ours and HF transformers), a resumable runner, and grid sweeps."""
