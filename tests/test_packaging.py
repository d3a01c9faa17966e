"""What gets installed: the lock against pyproject's ranges, and mipo's kernels beside Hugging Face's `kernels`.

mipo's Triton kernels live in the top-level ``kernels/`` folder and import as ``mipo.kernels`` (the link
``mipo/kernels``); the folder has no ``__init__.py``, so ``import kernels`` finds Hugging Face's distribution,
which transformers 5.25 imports, from the repository root as from anywhere else.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import lock  # noqa: E402  (tools/lock.py)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _lock_problems(lock_file: Path, requirements: list[Requirement]) -> list[str]:
    pins = lock.read_lock(lock_file)
    problems = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # not for this platform (e.g. triton off Linux)
        name = lock.normalize(requirement.name)
        if name not in pins:
            problems.append(f"{lock_file.name}: {requirement.name} is a dependency but is not locked")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{lock_file.name}: {name}=={pins[name]} is outside pyproject's {requirement}")
    return problems


def test_lock_holds_every_dependency_within_pyproject_ranges():
    """Every direct dependency, the test extra and the offline assets are locked, each inside its declared range."""
    assert _lock_problems(ROOT / "requirements.lock", _requirements("test", "eval", "assets")) == []


def test_bench_lock_holds_every_dependency_and_trl():
    problems = _lock_problems(ROOT / "requirements-bench.lock", _requirements("assets") + [Requirement("trl==1.16.0")])
    assert problems == []


def test_lock_names_one_version_per_package_and_torch_first_pin():
    pins = lock.read_lock(ROOT / "requirements.lock")
    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(pins), "a package is locked twice"
    constraints = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert f"torch=={pins['torch']}" in constraints, "the lock and constraints.txt must pin the same torch"
    assert "mipo" not in pins


def test_lock_diff_names_what_moved():
    assert lock.diff({"a": "1.0", "b": "2.0"}, {"a": "1.0", "b": "2.1+cpu", "c": "0.1"}) == [
        "b: 2.0 -> 2.1", "c: (not in lock) -> 0.1"]
    assert lock.diff({"a": "1.0"}, {}) == ["a: 1.0 -> (not installed)"]


def test_read_lock_names_the_line_of_a_bad_entry(tmp_path):
    path = tmp_path / "bad.lock"
    path.write_text("# comment\nnumpy==2.0\ntorch>=2\n")
    with pytest.raises(ValueError, match=r"bad.lock:3: expected `name==version`"):
        lock.read_lock(path)


# ------------------------------------------------------------------------------------------------
# mipo.kernels beside Hugging Face's kernels

CHECK = textwrap.dedent(
    """
    import importlib.metadata, json, sys
    import kernels
    import mipo
    import mipo.kernels.logprob as mipo_kernels
    import mipo.model.logprobs
    from transformers.utils.import_utils import _is_package_available
    from tests_helpers_free import score_once
    print(json.dumps({
        "hf_kernels_file": kernels.__file__,
        "hf_kernels_version": importlib.metadata.version("kernels"),
        "probe": list(_is_package_available("kernels", return_version=True)),
        "mipo_file": mipo.__file__,
        "mipo_kernels_file": mipo_kernels.__file__,
        "scoring_uses": [mipo.model.logprobs.logprob_gather.__module__, mipo.model.logprobs.linear_logprob.__module__],
        "same_functions": mipo.model.logprobs.logprob_gather is mipo_kernels.logprob_gather
                          and mipo.model.logprobs.linear_logprob is mipo_kernels.linear_logprob,
        "scores": score_once(),
    }))
    """
)

SCORE = textwrap.dedent(
    """
    import torch
    from mipo.model.logprobs import Scorer, ScoringSettings
    from mipo.model.loading import load_model, load_tokenizer

    def score_once():
        tokenizer = load_tokenizer({"tokenizer": "byte", "random_init": True})
        config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 1}
        model = load_model({"random_init": True, "tokenizer": "byte", "config": config}, device="cpu",
                           vocab_size=len(tokenizer))
        scorer = Scorer(model, tokenizer, ScoringSettings(max_length=64, max_prompt_length=32, batch_size=2, kernel="torch"))
        prompts = [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "Capital of France?"}]]
        scores = scorer.score(prompts, ["4", "Paris"], desc=None)
        assert torch.isfinite(scores).all() and (scores < 0).all(), scores
        return scores.tolist()
    """
)


def _hf_kernels_required() -> str | None:
    """The `kernels` requirement transformers declares (None where it declares none, before 5.25)."""
    for line in importlib.metadata.requires("transformers") or []:
        requirement = Requirement(line)
        if requirement.name == "kernels" and (requirement.marker is None or requirement.marker.evaluate()):
            return str(requirement)
    return None


def _run_check(cwd: Path, pythonpath: list[Path]) -> dict:
    helpers = cwd / "tests_helpers_free.py"
    helpers.write_text(SCORE)
    try:
        env = {"PYTHONPATH": ":".join(map(str, pythonpath)), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
               "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"}
        result = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        helpers.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_both_packages(found: dict, mipo_root: Path) -> None:
    assert Path(found["hf_kernels_file"]).resolve().parent.name == "kernels"
    assert not Path(found["hf_kernels_file"]).resolve().is_relative_to(ROOT / "kernels"), found["hf_kernels_file"]
    assert found["probe"] == [True, found["hf_kernels_version"]]  # transformers' probe reads Hugging Face's version
    assert Path(found["mipo_file"]).resolve().is_relative_to(mipo_root)
    assert Path(found["mipo_kernels_file"]).name == "logprob.py"
    assert found["scoring_uses"] == ["mipo.kernels.logprob", "mipo.kernels.logprob"] and found["same_functions"]
    assert len(found["scores"]) == 2


@pytest.fixture(scope="module")
def hf_kernels_path(tmp_path_factory) -> list[Path]:
    """Where Hugging Face's `kernels` imports from: this environment when the lock has it, else a scratch install."""
    try:
        importlib.metadata.version("kernels")
        return []
    except importlib.metadata.PackageNotFoundError:
        target = tmp_path_factory.mktemp("hf-kernels")
        requirement = _hf_kernels_required() or "kernels"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), requirement],
                       check=True, timeout=600)
        return [target]


def test_from_the_repository_root_import_kernels_is_hugging_faces(hf_kernels_path):
    """Run where pytest, pipeline.py and torchrun run: the checkout first on sys.path, HF's kernels installed."""
    found = _run_check(ROOT, [ROOT, *hf_kernels_path])
    _assert_both_packages(found, ROOT)
    assert Path(found["mipo_kernels_file"]).resolve() == (ROOT / "kernels" / "logprob.py").resolve()


@pytest.mark.slow
def test_installed_mipo_beside_hf_kernels_from_outside_the_repository(hf_kernels_path, tmp_path):
    """`pip install .` (a wheel, not the checkout) beside Hugging Face's kernels; imported from another folder."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
                   check=True, timeout=600)
    assert not (target / "kernels").exists(), "mipo must not install a top-level `kernels` package"
    assert (target / "mipo" / "kernels" / "logprob.py").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _run_check(elsewhere, [target, *hf_kernels_path])
    _assert_both_packages(found, target)
    owners = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m, json; print(json.dumps(m.packages_distributions()))"],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=elsewhere, capture_output=True, text=True,
        check=True).stdout
    owners = json.loads(owners)  # this environment's own (editable) mipo is listed too: every mipo names only mipo
    assert set(owners.get("mipo", [])) == {"mipo"}
    assert "mipo" not in owners.get("kernels", []), owners.get("kernels")
