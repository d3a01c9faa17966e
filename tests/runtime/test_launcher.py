"""The cluster launcher's parts in one process: ranks from submitit's and SLURM's environment, the deferred
checkpoint signal, status.json, the pinned sweep directory, and the sbatch script Hydra's submitit launcher
writes for each model size (through the plugin's own code path; sbatch is never called)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from mipo.runtime import distributed, preemption
from mipo.stages import launch
from tests.helpers import ROOT


def test_ranks_come_from_submitit_or_srun_and_never_from_a_batch_script() -> None:
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
             "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "4242"}
    old = {k: os.environ.get(k) for k in local}
    os.environ.update(local)  # submitit.JobEnvironment reads os.environ
    try:
        found = distributed.launch_environment(os.environ)
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert found == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(distributed.job_port("4242"))}
    srun = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "991",
            "SLURM_STEP_NODELIST": "gpu[017-020],gpu031", "SLURM_NTASKS": "8"}
    assert distributed.launch_environment(srun) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                    "MASTER_ADDR": "gpu017", "MASTER_PORT": str(distributed.job_port("991"))}
    assert distributed.launch_environment({**srun, "MASTER_PORT": "29400"})["MASTER_PORT"] == "29400"
    # a plain `python train.py` inside an sbatch --ntasks=4 script: no step of several tasks, one process
    assert distributed.launch_environment({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}) == {}
    assert distributed.job_port("991") == distributed.job_port("991") != distributed.job_port("992")
    assert 20000 <= distributed.job_port("123_4") < 40000
    assert distributed.first_host("node[1-3]-ib,other") == "node1-ib" and distributed.first_host("solo") == "solo"


@pytest.fixture
def submitit_handler(monkeypatch: pytest.MonkeyPatch):
    """A stand-in for submitit's handler of SIGUSR2 in a job: records its calls and exits as submitit's
    requeue does (local executor: status 144)."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise SystemExit(144)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    previous = signal.signal(signal.SIGUSR2, handler)
    yield calls
    preemption.uninstall()
    signal.signal(signal.SIGUSR2, previous)


def test_the_signal_waits_for_the_end_of_a_step_inside_the_loop(submitit_handler) -> None:
    outcomes = []
    assert not preemption.requested()  # not installed: never
    assert preemption.install(on_outcome=lambda state, detail: outcomes.append((state, detail)))
    assert not preemption.requested()
    with pytest.raises(SystemExit) as stopped, preemption.deferred():
        os.kill(os.getpid(), signal.SIGUSR2)  # delivered here; only sets the flag
        assert submitit_handler == [] and preemption.requested()
        preemption.stop()  # what the loop calls after the checkpoint
    assert stopped.value.code == 144 and submitit_handler == [signal.SIGUSR2]
    assert outcomes == [("requeued", "signal SIGUSR2")]


def test_outside_the_loop_submitit_handles_the_signal_at_once(submitit_handler) -> None:
    preemption.install()
    with pytest.raises(SystemExit):
        os.kill(os.getpid(), signal.SIGUSR2)
    assert submitit_handler == [signal.SIGUSR2]
    # a signal after the loop's last check is handed over as the loop ends normally
    with pytest.raises(SystemExit), preemption.deferred():
        os.kill(os.getpid(), signal.SIGUSR2)
    assert len(submitit_handler) == 2


def test_install_does_nothing_outside_submitit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert not preemption.install() and not preemption.installed()


def test_status_file_keeps_attempts_and_history(tmp_path: Path) -> None:
    launch.write_status(tmp_path, "running", new_attempt=True, job_id="11")
    launch.write_status(tmp_path, "requeued", signal="signal SIGUSR2")
    launch.write_status(tmp_path, "running", new_attempt=True)
    launch.write_status(tmp_path, "failed", error="ValueError: bad")
    status = launch.write_status(tmp_path, "finished")
    assert status == launch.read_status(tmp_path)
    assert status["state"] == "finished" and status["attempts"] == 2 and status["job_id"] == "11"
    assert "error" not in status
    assert [(h["attempt"], h["state"]) for h in status["history"]] == [
        (1, "running"), (1, "requeued"), (2, "running"), (2, "failed"), (2, "finished")]
    with pytest.raises(ValueError, match="job state 'done': expected one of running, finished, failed, requeued"):
        launch.write_status(tmp_path, "done")
    assert launch.read_status(tmp_path / "missing") == {}


def test_submitit_sweeps_pin_the_sweep_directory_resolved_once() -> None:
    config = OmegaConf.create({"hydra": {"overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": ["seed=0,1"]},
                                         "sweep": {"dir": "multirun/${x}"},
                                         "launcher": {"_target_": launch.SUBMITIT_LAUNCHERS + "SlurmLauncher"}},
                               "x": "it's here"})
    assert launch.submitit_launcher(config)
    launch.JobStates().on_multirun_start(config)
    assert list(config.hydra.overrides.hydra) == ["hydra.mode=MULTIRUN", r"hydra.sweep.dir='multirun/it\'s here'"]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([config.hydra.overrides.hydra[-1]])[0]
    assert parsed.value() == "multirun/it's here"
    launch.JobStates().on_multirun_start(config)  # given already: not pinned twice
    assert len(config.hydra.overrides.hydra) == 2
    basic = OmegaConf.create({"hydra": {"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}})
    assert not launch.submitit_launcher(basic)


# --------------------------------------------------------------------------------------------
# The sbatch script, through the plugin's code path (hydra_submitit_launcher's launch), no cluster
# --------------------------------------------------------------------------------------------

def sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> str:
    """The sbatch file submitit would submit for a one-job multirun with ``overrides`` under hydra/launcher=slurm."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    import mipo.stages.cli  # noqa: F401  (registers the resolvers the config uses)

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were installed
    scripts = []

    def map_array(executor, fn, *iterables):  # where submitit would write the file and call sbatch
        slurm = executor._executor
        slurm.parameters["map_count"] = len(iterables[0])
        scripts.append(slurm._make_submission_file_text(slurm._submitit_command_str, "uid"))
        return [type("Job", (), {"results": lambda self: [JobReturn()]})() for _ in iterables[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep",
                                                       *overrides], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    launcher.launch([["seed=0"]], initial_job_idx=0)
    assert len(scripts) == 1
    return scripts[0]


@pytest.mark.parametrize(("model", "gpus", "memory", "minutes"), [
    ("llama-3.2-1b-instruct", 1, "64GB", 480), ("qwen2.5-3b-instruct", 1, "96GB", 720),
    ("llama-3-8b-instruct", 4, "320GB", 1440)])
def test_slurm_jobs_take_their_size_from_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str,
                                                   gpus: int, memory: str, minutes: int) -> None:
    script = sbatch_script(tmp_path, monkeypatch, f"model={model}", "hydra.launcher.partition=gpu")
    lines = set(script.splitlines())
    for flag in (f"--gpus-per-node={gpus}", f"--ntasks-per-node={gpus}", "--cpus-per-task=8", f"--mem={memory}",
                 f"--time={minutes}", "--nodes=1", "--partition=gpu", "--signal=USR2@600", "--requeue",
                 "--array=0-0%1"):
        assert f"#SBATCH {flag}" in lines, (flag, script)
    assert f"--output {tmp_path}/sweep/.submitit/%A_%a/%A_%a_%t_log.out" in script
    command = script.splitlines()[-1]
    assert command.startswith("srun --unbuffered --output") and " -u -m submitit.core._submit " in command
    assert command.endswith(f"{tmp_path}/sweep/.submitit/%j")


def test_slurm_resources_are_overridable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = sbatch_script(tmp_path, monkeypatch, "model=llama-3-8b-instruct", "hydra.launcher.gpus_per_node=8",
                           "hydra.launcher.tasks_per_node=8", "model.resources.timeout_min=90",
                           "hydra.launcher.account=lab")
    for flag in ("--gpus-per-node=8", "--ntasks-per-node=8", "--time=90", "--account=lab"):
        assert f"#SBATCH {flag}" in script.splitlines(), flag
