"""Pure functions, no Ray and no files: LoRA math, top-K merge weights, LaMP tasks, BM25, metrics,
statistics, the per-slot optimizer and the method table."""
