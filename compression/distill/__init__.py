"""Distilled students: prune a teacher (Block Influence), distil it on the teacher's distributions, score it
against the teacher on held-out traffic.

- data.py        DistillExample (token ids, response start, optional top-k + sampled logprobs) + record adapter
- losses.py      forward KL (full vocab), top-k + tail-bucket KL (capture records), cross-entropy
- prune.py       Block Influence layer removal, optional MLP narrowing → a standard transformers checkpoint
- train.py       the training loop (budgets, accumulation, checkpoints/resume, early stop, progress)
- checkpoint.py  crash-safe training checkpoints
- evaluate.py    KL / top-1 / hardest-10% of any single-sequence engine against the teacher on held-out traffic
- teacher_data.py  stand-in generator of teacher records from prompts (until compression/traffic.py's)
- method.py      the `distill` method: options (= cache-key recipe), plan, build through the artifact cache
"""
