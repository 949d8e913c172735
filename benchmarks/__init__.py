"""Side-by-side benchmarks: each system in its own process, same token ids, medians of several runs."""
