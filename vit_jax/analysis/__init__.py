"""The ViT paper's analysis figures, one file per analysis.

Each module has a pure function (numpy / jax; the jax ones also run under
`jax.jit`) and a `plot` writing a PNG with matplotlib's Agg backend:

- `attention_distance`: mean attention distance per layer and head, in pixels
  (Figure 7, right);
- `posemb_similarity`: cosine similarity of the position embeddings
  (Figure 7, centre);
- `rollout`: attention rollout maps (Abnar & Zuidema 2020; Figure 6);
- `filters`: principal components of the patch-embedding filters
  (Figure 7, left).

The command line `python -m vit_jax.analyze` runs them on a checkpoint.
`curves` draws a run's training curves from its metrics.jsonl alone (no
checkpoint; several runs overlaid), which training and a sweep also write.
"""
