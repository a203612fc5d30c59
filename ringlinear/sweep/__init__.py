"""`ringlinear sweep`: the hybrid-ratio study of the paper's §2.2.2 (Fig. 3) at small scale, with retrieval.

- `grid`: ratios, sizes and budgets; parameter-matched shapes (active non-embedding parameters within 2%)
- `flops`: the training-FLOP count of a run (formula in its docstring and docs/sweep.md)
- `corpus`: one corpus (natural text + synthetic retrieval documents), tokenizer and tokenised cache for all runs
- `retrieval`: seeded MQAR and passkey generators, their evaluation set and scoring
- `plan`: every run's spec and TrainConfig; `runs`: executing runs (resume, skip, parallel workers)
- `fit`: L(C) = a (C/C0)^-b + e with uncertainties; `analysis`: frontier, retrieval scores, the claims' verdicts
- `report`: results.json, loss_vs_flops.png, retrieval.png, report.md; `cli`: the flags and the order of work
"""
