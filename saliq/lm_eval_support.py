"""Zero-shot (and few-shot) accuracy through lm-evaluation-harness (`pip install saliq[eval]`): `saliq eval CKPT
--tasks piqa,arc_easy,...` loads the checkpoint with saliq.load (verified), wraps it in lm-eval's HF model and runs
`lm_eval.simple_evaluate`, writing lm-eval's results JSON.

lm-eval's own command line works too once saliq is imported in its process, which registers the quantizer with
transformers; lm-eval loads no plugins by itself, so `python -m saliq.lm_eval_support` is its command line with saliq
imported first:

    python -m saliq.lm_eval_support run --model hf --model_args pretrained=CKPT,dtype=float32 --tasks piqa
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class TaskError(ValueError):
    """A task name lm-eval does not know, or an include path that is not a directory."""


def task_manager(include_path=None, tasks=()):
    """lm-eval's task index: only `include_path` when it holds every task asked for (indexing lm-eval's
    thousands of built-in tasks takes seconds), else the built-in tasks as well."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise TaskError(f"--include-path {str(include_path)!r} is not a directory of lm-eval task YAML files")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if tasks and set(tasks) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=str(include_path))


def check_tasks(tasks: list[str], manager) -> None:
    """Every task (or group / tag) name must be known to lm-eval, before the model is loaded."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        near = sorted(k for k in known if any(u.split("_")[0] in k for u in unknown))[:8]
        raise TaskError(f"--tasks: unknown {unknown}; lm-eval knows {len(known)} tasks"
                        + (f", e.g. {near}" if near else "") + " (`lm-eval ls tasks`; local tasks: --include-path)")


def evaluate_tasks(model_path, tasks: list[str], include_path=None, num_fewshot: int | None = None,
                   limit: float | None = None, batch_size: int = 1, device: str = "cpu", output=None,
                   log_samples: bool = False, seed: int = 1234, manager=None) -> dict:
    """lm-eval results of a model (saliq checkpoint, transformers directory or .gguf) on `tasks`; written to
    `output` (lm-eval's results JSON, with saliq's provenance under "saliq") when given."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    from . import hf
    from .provenance import model_record, versions

    if manager is None:
        manager = task_manager(include_path, tasks)
        check_tasks(tasks, manager)
    model, tok = hf.load_model(model_path, device=device)
    if tok is None:
        raise ValueError(f"{model_path} has no tokenizer files; lm-eval tasks need one")
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # a non-zero rank of a distributed run
        return {}
    results["saliq"] = {**model_record(model_path), "tasks": list(tasks), "num_fewshot": num_fewshot,
                        "limit": limit, "seed": seed, "include_path": str(include_path) if include_path else None,
                        "versions": versions()}
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        os.replace(tmp, out)
    return results


def summary(results: dict) -> dict:
    """{task: {metric: value}} of the numeric metrics (stderr entries and aliases left out)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"}
    return out


def table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def main() -> None:
    """lm-eval's command line, with saliq imported (its quantizer registered) first."""
    import saliq  # noqa: F401  (registers quant_method "saliq" with transformers)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
