"""The paper's analyses, built in: gradient equivalence, method comparisons, length dynamics.

- `equivalence`: `gradient_equivalence(policy, task, ...)`: GRPO's full-parameter gradient vs
  F-ISFT's and other variants' on one real rollout batch (`rlino analyze equivalence`).
- `compare`: `run_compare(spec, out_dir)`: methods x seeds from one base model, resumable
  (`rlino compare`); `load_spec`, `spec_from_flags`, `CompareSpec`.
- `report`: `write_report(out_dir)`: report.md, summary.json and plots from a comparison's runs;
  statistics over seeds (mean, std, t confidence interval).
- `lengths`: `analyze_lengths(run_dirs, out_dir)` and the per-token weight each loss aggregation
  gives a sample of length L (`rlino analyze lengths`).
- `plots`: small matplotlib (Agg) PNGs.

Submodules import torch only inside functions, so importing them is cheap.
"""
