"""avg@k evaluation: a model-independent core (`evaluate` on any PolicyFn) and the model-backed
driver of `tgpo-jax eval` (`run_eval`)."""

from tgpo_jax.eval.evaluator import EVAL_REWARD, Completion, EvalItem, EvalReport, PolicyFn, SourceResult, evaluate
from tgpo_jax.eval.model_policy import load_eval_items, run_eval, sampler_policy, stop_ids_for
from tgpo_jax.eval.report import markdown_table, write_report

__all__ = [
    "EVAL_REWARD",
    "EvalItem",
    "EvalReport",
    "Completion",
    "PolicyFn",
    "SourceResult",
    "evaluate",
    "load_eval_items",
    "run_eval",
    "sampler_policy",
    "stop_ids_for",
    "markdown_table",
    "write_report",
]
