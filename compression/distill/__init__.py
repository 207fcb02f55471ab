"""Distilled students: prune a teacher (Block Influence), distil it on the teacher's distributions, score it
against the teacher on held-out traffic.

- data.py        DistillExample (token ids, response start, optional top-k + sampled logprobs) + record adapter
- losses.py      forward KL (full vocab), top-k + tail-bucket KL (capture records), cross-entropy
- prune.py       Block Influence layer removal, optional MLP narrowing → a standard transformers checkpoint
- train.py       the training loop (budgets, accumulation, checkpoints/resume, early stop, progress)
- checkpoint.py  crash-safe training checkpoints
- evaluate.py    KL / top-1 / hardest-10% of any single-sequence engine against the teacher on held-out traffic
- options.py     the options of `method: distill` (= the cache-key recipe)
- pipeline.py    the build steps: synthetic teacher data, pruned init, trained student
- method.py      the `distill` method in the registry: plans the steps as cached nodes
"""
