"""Long-context evals: `lctrain eval niah` and `lctrain eval position-loss`.

- ruler.py: RULER-style NIAH samples (tasks, templates, exact token budget, depth) and the scorer
- text.py: haystack text the machine already has (noise sentences, the embedded essay corpus)
- generate.py: greedy decoding on the model's cache, with a context-parallel prefill
- niah.py / position_loss.py: the two commands (`main(argv)`), their JSON/CSV outputs
- plots.py: heatmaps and log-x loss curves (matplotlib Agg)
- runtime.py: eval config from the checkpoint + parallel overrides, self-launch, mesh, model loading
"""
