"""Long-context evaluation: passkey, needle-in-a-haystack, RULER-style tasks, perplexity by position.

    qwenjax eval EXPERIMENT.yaml [--set eval.lengths=[4096,8192] ...]   # -> <run dir>/eval/

Every prompt is built offline and deterministically from `eval.seed`, measured in tokens of the
model's own tokenizer: the prompt has exactly the requested length and each needle sits at the
requested depth (to within one filler sentence). Results: results.json, results.md, heatmaps.

Modules: `filler` (offline haystack text), `haystack` (exact-length prompts), `tasks` (samples and
scoring), `needle` (passkey, niah_single, niah_multikey), `ruler` (variable_tracking,
common_words), `perplexity`, `model_api` (the `EvalModel` protocol and the CausalLM adapter),
`loading` (model + tokenizer of an experiment), `report`, `runner`.
"""

from qwenjax.evals.model_api import EvalModel, QwenJaxModel
from qwenjax.evals.runner import run, run_experiment

__all__ = ["EvalModel", "QwenJaxModel", "run", "run_experiment"]
