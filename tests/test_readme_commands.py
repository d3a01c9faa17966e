"""Every command in README.md and docs/*.md composes, and does what its caption says.

A command is a line of a fenced code block, or an inline `code` span, that starts with python, torchrun or
make and runs train.py, sample.py, evaluate.py or pipeline.py (a make target through its recipe in the
Makefile); backslash continuations are joined. Each job of it (a ``-m`` line: every job of the sweep, expanded
as Hydra's basic sweeper does) is composed with Hydra's compose API and checked:

* the config can run: ``config_problems`` is empty (with torchrun's world size where the line has one);
* lengths hold the task's prompts for a real tokenizer (every model but the byte-level tiny-llama):
  ``data.max_prompt_length`` >= the longest prompt of the task, measured with SmolLM2's tokenizer on the
  offline data (the test fixtures' rows where a task has no offline copy; GSM8K's 8-shot prompt at least),
  and the room after it holds ``sampling.max_new_tokens``;
* a paper experiment on a judged personalization task uses the judge its experiment names (or one named
  on the line), and that judge is not a weak one;
* ``trainer.strategy=fsdp`` trains only under torchrun or a cluster launcher (``hydra/launcher=...``), and a
  launcher line sweeps one model (the launcher sizes all its jobs from the model's ``resources``);
* an ``evaluate.py`` line names the base ``model=`` its trained model came from, unless its experiment sets
  the model (the CPU experiments, on SmolLM2).

A placeholder (``<date>``) stands for a value the reader fills in, and is composed as a plain name. Jobs
that differ only in ``seed=`` are composed once (no check reads the seed). Lines that only print
(``--cfg job``, ``--help``) are composed but not checked for run settings. Lines with ``hydra/launcher=...``
are skipped while ``conf/hydra/launcher/`` does not exist.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mipo.data.encoding import encode_prompt
from mipo.data.tasks import get_task
from mipo.model.loading import load_tokenizer
from mipo.reporting.jobs import expand_sweep
from tests.helpers import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRY_POINTS = ("train.py", "sample.py", "evaluate.py", "pipeline.py")
TRAINING_ENTRIES = ("train.py", "pipeline.py")
CONF = ROOT / "conf"
# Where a task has no offline copy, its prompts are measured on the fixtures' rows (tests/fixtures/README.md).
FIXTURES = {"svamp": "svamp/test.jsonl", "arc_easy": "arc_easy/test.jsonl", "prism": "prism/conversations.jsonl",
            "community_alignment": "community_alignment/filtered.jsonl",
            "multifaceted_bench": "multifaceted_bench/train.jsonl"}
MATH_TASKS = ("gsm8k", "svamp")  # their prompt carries GSM8K's 8-shot block


@dataclass(frozen=True)
class Command:
    """One documented command: where it is, how it is launched, and each job's overrides."""

    where: str
    text: str
    launcher: str  # python | torchrun
    entry: str
    jobs: tuple[tuple[str, ...], ...]
    world: int  # torchrun's nproc_per_node x nnodes; 1 for python
    prints_only: bool = False  # --cfg, --help, --info: composes and prints, runs nothing

    def distinct_jobs(self) -> list[tuple[str, ...]]:
        """The jobs without their ``seed=``, each once."""
        return list(dict.fromkeys(tuple(o for o in job if not o.startswith("seed=")) for job in self.jobs))


# --------------------------------------------------------------------------------------------------
# Finding the commands
# --------------------------------------------------------------------------------------------------

def document_lines(path: Path) -> list[tuple[int, str]]:
    """Candidate command lines of a Markdown file: code block lines (continuations joined) and inline spans."""
    found, in_fence, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_fence, pending = not in_fence, ""
            continue
        if in_fence:
            code = line.strip()
            if pending:
                pending += " " + code
            else:
                pending, start = code, number
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip()
                continue
            found.append((start, pending))
            pending = ""
        else:
            found += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return [(n, text) for n, text in found if re.match(r"^([A-Z_]+=\S+\s+)*(\S*/)?(python3?|torchrun|make)\s", text)]


@functools.cache
def makefile() -> tuple[dict[str, str], dict[str, list[str]]]:
    """The Makefile's variables and each target's recipe lines (continuations joined)."""
    variables, recipes, target, pending = {}, {}, None, ""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and target is not None:
            pending += " " + line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            recipes[target].append(pending.strip())
            pending = ""
            continue
        if match := re.match(r"^([A-Za-z_]+)\s*[:?]?=\s*(.*)$", line):
            variables[match[1]] = match[2].strip()
        elif match := re.match(r"^([A-Za-z0-9_.-]+):", line):
            target = match[1]
            recipes[target] = []
    return variables, recipes


def expand_make(tokens: list[str]) -> list[str]:
    """The recipe lines of ``make <target> VAR=value ...`` that run an entry point, variables substituted."""
    variables, recipes = makefile()
    given = dict(token.split("=", 1) for token in tokens[2:] if "=" in token)
    values = {**variables, **given}

    def substitute(text: str) -> str:
        for _ in range(5):  # nested $(VENV)/bin/python
            text = re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], ""), text)
        return text

    return [substitute(line) for line in recipes.get(tokens[1], []) if any(e in line for e in ENTRY_POINTS)]


def parse_command(where: str, text: str) -> list[Command]:
    tokens = shlex.split(re.sub(r"<([^<>]+)>", r"\1", text), comments=True)  # <date> -> date
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # WANDB_MODE=disabled python ...
        tokens.pop(0)
    if not tokens:
        return []
    program = Path(tokens[0]).name
    if program == "make" and len(tokens) > 1:
        return [c for line in expand_make(tokens) for c in parse_command(f"{where} (make {tokens[1]})", line)]
    script = next((i for i, token in enumerate(tokens) if token.endswith(".py")), None)
    if script is None or Path(tokens[script]).name not in ENTRY_POINTS or program not in ("python", "python3", "torchrun"):
        return []
    options = " ".join(tokens[1:script])
    world = 1
    if program == "torchrun":
        nproc = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", options)
        nodes = re.search(r"--nnodes[= ](\d+)", options)
        world = int(nproc[1] if nproc else 1) * int(nodes[1] if nodes else 1)
    args = tokens[script + 1:]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    multirun = "-m" in args or "--multirun" in args
    jobs = tuple(tuple(job) for job in expand_sweep(overrides)) if multirun else (tuple(overrides),)
    prints_only = any(a in ("--cfg", "-c", "--help", "-h", "--info", "-i", "--hydra-help") for a in args)
    return [Command(where, text, "torchrun" if program == "torchrun" else "python", Path(tokens[script]).name,
                    jobs, world, prints_only)]


def documented_commands() -> list[Command]:
    commands = []
    for path in DOCUMENTS:
        for number, text in document_lines(path):
            commands += parse_command(f"{path.relative_to(ROOT)}:{number}", text)
    return commands


COMMANDS = documented_commands()


# --------------------------------------------------------------------------------------------------
# What the checks measure
# --------------------------------------------------------------------------------------------------

@functools.cache
def smollm2_tokenizer():
    model = OmegaConf.load(CONF / "model" / "smollm2-135m-instruct.yaml")
    model.chat_template_kwargs = OmegaConf.load(CONF / "config.yaml").model.chat_template_kwargs
    return load_tokenizer(model, ROOT / ".cache" / "mipo")


@functools.cache
def task_examples(name: str) -> tuple:
    """The task's rows: its offline copy, else the fixture rows in the hub's schema."""
    options = OmegaConf.to_container(OmegaConf.load(CONF / "task" / f"{name}.yaml")).get("options") or {}
    task = get_task(name, **options)
    source = "offline" if task.offline_available() else str(ROOT / "tests" / "fixtures" / FIXTURES[name])
    return task, tuple(task.load(source))


@functools.cache
def longest_prompt(name: str) -> int:
    """The task's longest prompt in SmolLM2 tokens (math tasks: at least GSM8K's, whose 8-shot block they share)."""
    task, examples = task_examples(name)
    longest = max(len(encode_prompt(smollm2_tokenizer(), task.messages(e))) for e in examples)
    return max(longest, longest_prompt("gsm8k")) if name in MATH_TASKS and name != "gsm8k" else longest


@functools.cache
def judged(name: str) -> bool:
    """The judge runs on the task (``judge.enabled: auto``): its prompts carry user contexts and references."""
    _, examples = task_examples(name)
    return any(e.context for e in examples) and any(e.reference for e in examples)


@functools.cache
def experiment_defaults(name: str) -> dict[str, str]:
    """``{group: option}`` the experiment overrides, following its parent experiments (``- paper_prism``)."""
    chosen: dict[str, str] = {}
    for entry in yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()).get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            chosen.update(experiment_defaults(entry))
        elif isinstance(entry, dict):
            chosen.update({key.split("/")[-1]: value for key, value in entry.items()})
    return chosen


@functools.cache
def composed(job: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(job))


def override(job: tuple[str, ...], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in job if o.lstrip("+").split("=", 1)[0] == key), None)


def job_problems(command: Command, job: tuple[str, ...], monkeypatch) -> list[str]:
    """Everything wrong with one job of ``command``, one line each."""
    from mipo.stages.config import config_problems

    cfg = composed(job)
    if command.prints_only:
        return []
    monkeypatch.setenv("WORLD_SIZE", str(command.world))
    problems = list(config_problems(cfg))
    experiment = override(job, "experiment")
    launcher = override(job, "hydra/launcher")
    if command.entry in TRAINING_ENTRIES and cfg.trainer.strategy == "fsdp" and command.launcher != "torchrun" \
            and launcher is None:
        problems.append("trainer.strategy=fsdp in one plain process (one rank): run it under torchrun or "
                        "hydra/launcher=...")
    if launcher is not None and len({override(other, "model") for other in command.jobs}) > 1:
        problems.append(f"hydra/launcher={launcher} sizes every job from one model's resources: sweep one model "
                        "per multirun line")
    if not cfg.model.get("random_init") and cfg.task.name in (*FIXTURES, "gsm8k", "arc_challenge", "persistbench"):
        need, room = longest_prompt(cfg.task.name), cfg.data.max_length - cfg.data.max_prompt_length
        if cfg.data.max_prompt_length < need:
            problems.append(f"data.max_prompt_length={cfg.data.max_prompt_length} cuts {cfg.task.name}'s prompts "
                            f"(the longest is {need} SmolLM2 tokens)")
        if room < cfg.sampling.max_new_tokens:
            problems.append(f"data.max_length - data.max_prompt_length = {room} < sampling.max_new_tokens="
                            f"{cfg.sampling.max_new_tokens}: responses are cut when scored")
    if experiment and experiment.startswith("paper") and judged(cfg.task.name):
        named = experiment_defaults(experiment).get("judge")
        if override(job, "judge") is None and cfg.judge.name != named:
            problems.append(f"judge {cfg.judge.name} is not the one experiment={experiment} names ({named})")
        if cfg.judge.weak:
            problems.append(f"judge {cfg.judge.name} is a weak judge, not one of the paper's")
    sets_model = experiment is not None and "model" in experiment_defaults(experiment)
    if command.entry == "evaluate.py" and override(job, "model") is None and not sets_model:
        problems.append("evaluate.py without model=: the base it compares with is the default SmolLM2")
    return problems


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------

def test_the_documents_hold_commands_of_every_kind():
    """The finder itself: the commands the issue names are found (a sweep, torchrun, make, evaluate.py)."""
    assert len(COMMANDS) >= 20
    assert any(c.launcher == "torchrun" and c.world == 4 for c in COMMANDS)
    assert any(len(c.jobs) >= 36 for c in COMMANDS)  # the whole-table multirun, expanded
    assert any("(make train-fsdp)" in c.where for c in COMMANDS)
    assert any(c.entry == "evaluate.py" for c in COMMANDS)
    assert all(c.entry in ENTRY_POINTS for c in COMMANDS)


def test_the_checks_catch_what_the_issue_found(monkeypatch):
    """Each check fails on the line the issue reported: the lengths 1024/768 for GSM8K, the PRISM evaluation
    against SmolLM2, FSDP in one process, the offline judge in a paper experiment; and a 7-8B cell under
    torchrun passes."""
    def problems(text: str) -> list[str]:
        (command,) = parse_command("issue", text)
        return job_problems(command, command.jobs[0], monkeypatch)

    cut = problems("python pipeline.py model=llama-3.2-1b-instruct task=gsm8k data.max_length=1024 "
                   "data.max_prompt_length=768")  # conf/config.yaml's lengths before the tasks set their own
    assert any("cuts gsm8k's prompts" in p for p in cut) and any("responses are cut" in p for p in cut)
    assert any("without model=" in p for p in problems(
        "python evaluate.py experiment=paper_prism eval.model_path=outputs/x/model judge=llama-3-8b-instruct"))
    assert any("fsdp in one plain process" in p for p in problems(
        "python pipeline.py experiment=paper_arc_easy model=llama-3-8b-instruct"))
    assert any("weak judge" in p for p in problems(
        "python pipeline.py experiment=paper_prism model=llama-3.2-3b-instruct judge=smollm2"))
    assert problems("torchrun --standalone --nproc_per_node=4 pipeline.py experiment=paper_arc_easy "
                    "model=llama-3-8b-instruct") == []
    if (CONF / "hydra" / "launcher").is_dir():
        assert any("one model per multirun" in p for p in problems(
            "python pipeline.py -m hydra/launcher=slurm experiment=paper_gsm8k model=llama-3-8b-instruct,qwen2.5-7b-instruct"))


def test_prompt_lengths_are_measured():
    """GSM8K's 8-shot prompts are ~1,000 tokens (longer than the default 768); ARC's fit the demo's 256."""
    assert 900 < longest_prompt("gsm8k") <= 1536
    assert longest_prompt("svamp") >= longest_prompt("gsm8k")
    assert longest_prompt("arc_challenge") <= 256
    assert judged("prism") and not judged("persistbench") and not judged("gsm8k")


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command(command: Command, monkeypatch):
    if any(override(job, "hydra/launcher") for job in command.jobs) and not (CONF / "hydra" / "launcher").is_dir():
        pytest.skip("conf/hydra/launcher/ does not exist yet")
    problems = {}
    for job in command.distinct_jobs():
        for problem in job_problems(command, job, monkeypatch):
            problems.setdefault(problem, " ".join(job))
    assert problems == {}, f"{command.where}: {command.text}"
