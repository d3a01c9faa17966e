"""The inputs check: what an entry point is given, checked before it loads a model or writes a file.

``mipo.stages.cli.setup(cfg, entry)`` runs ``check_inputs`` first thing in every entry point:

1. the config's values (``mipo.stages.config.check_config``), after a leading ``~`` in every path
   setting is expanded (``expand_path_settings``: a quoted ``'~/data/x.jsonl'`` reaches the config as it is);
2. the run directory: a file, or a path no folder can be made at, is refused; one that holds an earlier
   run's outputs is never written into again unless ``overwrite=true``; ``train.py`` continues its own
   unfinished run with ``trainer.resume=true``, and ``trainer.resume=must`` refuses a directory without a
   checkpoint (``run_dir_problems``, which the Hydra callback ``mipo.stages.cli.RunDirGuard`` also runs before
   Hydra writes ``.hydra/`` into the directory); a job of a submitit sweep (``hydra/launcher=slurm|local``)
   always continues its own directory's unfinished training, as a requeued job must (``job_resume``);
3. the data the entry point is about to read, where it applies:

   ==========  ====================================================================================
   sample      the training prompts exist in the numbers asked for; the negative strategy can pair them
   train       the pairs file exists, every line is a valid pair (``mipo.data.pairs.read_pairs``: roles,
               empty responses, uids), it holds at least one batch, at most ``data.max_identical_fraction``
               of its pairs have y+ == y-, and every pair carries what the loss needs (x' for
               SAMI/InfoNCE, K - 1 extra negatives for K > 1)
   evaluate    the evaluation prompts exist; eval.mi_k is at most the distinct other prompts of a
               row; eval.model_path is a model folder (or LoRA adapter folder) of the base model's
               architecture and vocabulary (``evaluated_model_problems``)
   pipeline    sample's checks (train's if the pairs file exists) and that the pairs sampling will
               write (after the negative strategy drops prompts) fill one batch, then evaluate's
   ==========  ====================================================================================

Every problem found is reported together, one line each, in one ``ConfigError``.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mipo.data.pairs import (
    PairsFileError,
    PreferencePair,
    identical_pairs_problem,
    max_identical_fraction,
    read_pairs,
)
from mipo.data.tasks import build_task, task_splits
from mipo.losses import LOSS_FAMILIES
from mipo.mi import available_k
from mipo.model.loading import base_description
from mipo.model.sources import (
    description_differences,
    folder_description,
    model_folder_problem,
)
from mipo.negatives import plan_negatives
from mipo.runtime.errors import raise_problems
from mipo.runtime.files import expand_home, folder_problem
from mipo.stages.config import check_config
from mipo.stages.evaluate import context_alternatives
from mipo.stages.keys import pairs_path
from mipo.stages.train import RESUME_MUST
from mipo.training.checkpoint import checkpoints_dir, latest_checkpoint

ENTRIES = ("sample", "train", "evaluate", "pipeline")
RUN_OUTPUTS = ("train.json", "eval.json", "metrics.jsonl", "model", "checkpoints")
UNFINISHED_TRAINING = ("metrics.jsonl", "model", "checkpoints")  # what a killed train.py leaves
log = logging.getLogger(__name__)
# the settings that name a file or folder: a leading ~ is expanded (``expand_path_settings``)
PATH_SETTINGS = ("paths.cache_dir", "data.pairs_path", "data.source", "model.name_or_path", "eval.model_path",
                 "judge.model.name_or_path")


@dataclass
class Inputs:
    """What the check found and read, handed to the stage so that it reads nothing twice."""

    run_dir: Path
    pairs_path: Path  # where sampling writes the pairs and training reads them (derived once, here)
    pairs: list[PreferencePair] | None = None  # train.py (and pipeline.py when the pairs file exists)


def check_inputs(cfg: DictConfig, entry: str, run_dir: str | Path) -> Inputs:
    """Raise ``ConfigError`` listing every problem with what ``entry`` (sample, train, ...) is given."""
    if entry not in ENTRIES:
        raise ValueError(f"unknown entry point {entry!r}; expected one of {ENTRIES}")
    expand_path_settings(cfg)
    check_config(cfg)  # the values first: the checks below assume them
    if entry == "train":
        job_resume(cfg, Path(run_dir))
    path = pairs_path(cfg)
    inputs = Inputs(Path(run_dir), path)
    problems = run_dir_problems(cfg, entry, inputs.run_dir)

    will_sample = not path.exists() or cfg.sampling.overwrite
    if entry == "train" or (entry == "pipeline" and not will_sample):
        inputs.pairs, pairs_problems = _read_pairs(cfg, path)
        problems += pairs_problems
    if entry == "pipeline" and not cfg.trainer.save_model:
        problems.append("trainer.save_model=false: pipeline.py evaluates the trained model, so it needs "
                        "trainer.save_model=true")
    if (entry in ("sample", "pipeline") and will_sample) or entry in ("evaluate", "pipeline"):
        problems += _data_problems(cfg, entry, sample=entry != "evaluate" and will_sample)
    raise_problems("these inputs", problems)
    return inputs


def job_resume(cfg: DictConfig, run_dir: Path) -> None:
    """``trainer.resume=false`` reads as ``true`` in a job of a submitit sweep (``SUBMITIT_EXECUTOR`` set), in place.

    Such a job's directory is its own (the same overrides name it on every attempt): a job requeued after the
    checkpoint signal (``mipo.runtime.preemption``) or a lost node finds its own unfinished training there
    and continues it from the newest checkpoint, whose inputs are checked against the run's
    (``check_same_inputs``); without a checkpoint it starts at step 0 as ``false`` would. ``overwrite=true``
    still starts again; a finished run is still refused. One INFO line when there is training to continue.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or cfg.trainer.get("resume") is not False or cfg.get("overwrite") is True:
        return
    with open_dict(cfg):
        cfg.trainer.resume = True
    if latest_checkpoint(run_dir) is not None:
        log.info("a submitit job continues its own run directory's training (trainer.resume=true): %s", run_dir)


def run_dir_problems(cfg: DictConfig, entry: str, run_dir: Path) -> list[str]:
    """Why ``entry`` must not write into ``run_dir`` (empty: it may): a file or a path no folder can be made
    at; an earlier run's outputs; for train.py with ``trainer.resume=must``, no checkpoint to resume from."""
    problem = folder_problem(run_dir, "hydra.run.dir")
    if problem:
        return [problem]
    resume = cfg.trainer.get("resume")
    if entry == "train" and resume == RESUME_MUST and cfg.get("overwrite") is not True \
            and latest_checkpoint(run_dir) is None:
        return [(f"trainer.resume={RESUME_MUST}: no checkpoint in {checkpoints_dir(run_dir)} (hydra.run.dir={run_dir}): "
                "nothing to resume; run with the hydra.run.dir of the run to continue, or trainer.resume=true to "
                "start at step 0 when there is none")]
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    if not found or cfg.get("overwrite") is True:
        return []
    unfinished_training = set(found) <= set(UNFINISHED_TRAINING)
    if entry == "train" and resume in (True, RESUME_MUST):
        if unfinished_training:
            return []
        return [(f"trainer.resume={str(resume).lower()}, but hydra.run.dir={run_dir} holds a finished run "
                f"({', '.join(found)}): there is nothing to resume (overwrite=true trains again from step 0)")]
    if entry == "train" and unfinished_training:
        hint = "add trainer.resume=true to continue that run, or overwrite=true to start it again"
    else:
        hint = "choose another hydra.run.dir, or add overwrite=true to replace them"
    return [(f"hydra.run.dir={run_dir} holds the outputs of an earlier run ({', '.join(found)}), which are never "
            f"overwritten: {hint}")]


def expand_path_settings(cfg: DictConfig) -> None:
    """Expand a leading ``~`` in every path setting (``PATH_SETTINGS``), in place: a quoted ``'~/data/x.jsonl'``
    reaches the config unexpanded, and no later reader of the setting expands it."""
    with open_dict(cfg):
        for key in PATH_SETTINGS:
            value = OmegaConf.select(cfg, key, default=None)
            if isinstance(value, str) and value.startswith("~"):
                OmegaConf.update(cfg, key, expand_home(value), merge=False)


def _read_pairs(cfg: DictConfig, path: Path) -> tuple[list[PreferencePair] | None, list[str]]:
    """The pairs of the file train would read, validated, or the problem with it."""
    if not path.exists():
        if cfg.data.pairs_path:
            return None, [f"data.pairs_path={path}: no such file (expected a pairs JSONL file)"]
        return None, [(f"no pairs file for these settings at {path}: run sample.py with the same overrides "
                      "first, or set data.pairs_path")]
    try:
        pairs = read_pairs(path)
    except PairsFileError as error:
        return None, [str(error)]
    if len(pairs) < cfg.trainer.batch_size:
        return pairs, [(f"{path} holds {len(pairs)} pairs, fewer than one batch (trainer.batch_size="
                       f"{cfg.trainer.batch_size}): expected at least {cfg.trainer.batch_size}")]
    identical = identical_pairs_problem(pairs, path, max_identical_fraction(cfg.data))
    return pairs, [*([identical] if identical else []), *_pairs_loss_problems(cfg, path, pairs)]


def _pairs_loss_problems(cfg: DictConfig, path: Path, pairs: list[PreferencePair]) -> list[str]:
    """What the loss needs from every pair: x' for SAMI/InfoNCE, K - 1 extra negatives for K > 1."""
    loss_type = cfg.loss.loss_type
    family = LOSS_FAMILIES.get(loss_type)
    problems = []
    if family is not None and family.needs_negative_prompt:
        missing = [p.where for p in pairs if p.metadata.get("negative_prompt") is None]
        if missing:
            problems.append(f"{missing[0]}: field 'negative_prompt' is missing ({len(missing)} of {len(pairs)} pairs of "
                            f"{path}): loss.loss_type={loss_type} scores y+ and y- under x' too (pairs written by "
                            "sample.py carry it)")
    k = cfg.negatives.get("num_negatives", 1)
    if isinstance(k, int) and k > 1:
        short = [p.where for p in pairs if len(p.metadata.get("extra_negatives") or []) < k - 1]
        if short:
            problems.append(f"{short[0]}: field 'extra_negatives' holds fewer than {k - 1} responses ({len(short)} of "
                            f"{len(pairs)} pairs of {path}): negatives.num_negatives={k} needs {k - 1} per pair; "
                            "sample the pairs with the same negatives.num_negatives")
    return problems


def _data_problems(cfg: DictConfig, entry: str, sample: bool) -> list[str]:
    """Problems with the task's prompts: the splits, the negatives (``sample``), the MI evaluation."""
    data = cfg.data
    try:
        task = build_task(cfg)
        train_examples, eval_examples = task_splits(cfg, task)
    except (ValueError, OSError, ImportError) as error:
        return [f"data.source={data.source}, data.num_train={data.num_train}, data.num_eval={data.num_eval}: {error}"]
    problems = []
    if sample:
        strategy = cfg.negatives.strategy
        try:
            plan = plan_negatives(task, train_examples, strategy, random.Random(cfg.seed),
                                  num_negatives=cfg.negatives.get("num_negatives", 1),
                                  prompt_set=cfg.negatives.get("prompt_set", "own"))
        except ValueError as error:
            problems.append(f"negatives={strategy} on {len(train_examples)} training prompts "
                            f"(data.num_train={data.num_train}): {error}")
        else:
            if entry == "pipeline" and len(plan.examples) < cfg.trainer.batch_size:  # train would refuse the pairs
                dropped = f" (negatives={strategy} drops {plan.dropped} of them)" if plan.dropped else ""
                problems.append(f"data.num_train={data.num_train}: {len(train_examples)} training prompts{dropped}, "
                                f"give {len(plan.examples)} pairs, fewer than one batch (trainer.batch_size="
                                f"{cfg.trainer.batch_size}): raise data.num_train or lower trainer.batch_size")
    if entry in ("evaluate", "pipeline"):
        problems += _evaluation_problems(cfg, entry, task, eval_examples)
    return problems


def _evaluation_problems(cfg: DictConfig, entry: str, task: Any, eval_examples: list) -> list[str]:
    problems = []
    prompts = [task.messages(e) for e in eval_examples]
    alternatives = context_alternatives(task, eval_examples)
    k_max = available_k(prompts, alternatives)
    if cfg.eval.mi_k > k_max:
        others = "other users' contexts" if alternatives is not None else "other distinct prompts"
        problems.append(f"eval.mi_k={cfg.eval.mi_k}: the {len(eval_examples)} evaluation prompts give a row at most "
                        f"{k_max} {others} for the MI marginal (data.num_eval={cfg.data.num_eval}): expected "
                        f"eval.mi_k <= {k_max}; lower eval.mi_k or raise data.num_eval")
    if entry == "evaluate" and cfg.eval.model_path:
        problems += evaluated_model_problems(cfg, cfg.eval.model_path)
    return problems


def evaluated_model_problems(cfg: DictConfig, model_path: str | Path) -> list[str]:
    """``eval.model_path``: a model folder (or LoRA adapter folder) of the base model's architecture and
    vocabulary: the evaluation scores both models with the base model's tokenizer (read from config.json
    and tokenizer.json; a base model whose files are not at hand is not compared)."""
    folder = Path(model_path)
    if not folder.exists():
        return [(f"eval.model_path={model_path} does not exist: expected a trained model folder "
                "(e.g. outputs/<date>/<time>/model)")]
    problem = model_folder_problem(folder, "eval.model_path")
    if problem:
        return [problem]
    evaluated = folder_description(folder, f"eval.model_path={folder}")
    base = base_description(cfg.model, cfg.paths.cache_dir) if evaluated is not None else None
    differences = description_differences(base, evaluated) if base is not None else []
    if not differences:
        return []
    return [(f"eval.model_path={folder} is not a model of the base model's kind ({base.where}): "
            f"{'; '.join(differences)} (evaluated vs base); the evaluation scores both with the base model's "
            "tokenizer: expected a model trained from the base model")]
