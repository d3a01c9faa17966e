"""An optional vLLM backend for sampling: ``sampling.backend=vllm``.

vLLM is an extra (``pip install -e ".[vllm]"``), like flash-attn. With it installed,
``sampling.backend=vllm`` decodes each chunk of a ``mipo.model.generation.Plan`` with a
``vllm.LLM`` engine instead of this repository's decode loop; without it (or for a model
vLLM cannot load: a randomly initialised one) the transformers backend is used and the
choice is logged (``resolve_backend``).

What stays the same as the transformers backend, so the two produce samples of the same
distribution (not the same strings: the numerics and the random streams differ):

* **The prompts**: the token ids of ``Plan.prompts`` (the chat template applied by
  ``mipo.data.chat.render_prompt`` and cut by ``truncate_prompt``) are sent as ``prompt_token_ids``;
  vLLM never renders or tokenizes a prompt itself.
* **The distribution**: ``DecodeSettings`` maps field for field to ``SamplingParams``
  (``sampling_params``): temperature (0 = greedy), top_p, top_k (None -> -1, no filtering),
  max_new_tokens -> max_tokens, and the options this repository fixes
  (``DecodeSettings.record``: no repetition penalty, no minimum length). The engine is built
  with ``generation_config="vllm"``, so the checkpoint's ``generation_config.json`` (e.g.
  Qwen2.5's repetition_penalty 1.05) shapes nothing, as in ``mipo.model.generation``.
* **The seeds**: prompt i of a plan samples with ``row_seed(seed, i)`` (a per-request seed),
  so a prompt's response does not depend on its batch, its chunk or the number of ranks.
* **The end**: a response ends at a stop id (``finish_reason`` "eos"; the same ids as the
  decode loop, ``mipo.data.chat.stop_token_ids``: the template's end-of-turn token, the eos and
  the generation config's ``eos_token_id``, sent as ``stop_token_ids``) or at max_new_tokens
  ("length"); its text is decoded from the token ids as the transformers backend decodes them.

Not run in this repository: vllm is not installed here (no GPU). The mapping above is tested
with a stand-in for the engine (``tests/training/test_distributed.py``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

from mipo.data.chat import Messages, stop_token_ids
from mipo.model.generation import (
    DecodeSettings,
    Generation,
    Generations,
    Plan,
    PlanSettings,
    _decode_text,
    assemble,
    generation_record,
    row_seed,
)
from mipo.runtime import distributed

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")
FINISH_REASONS = {"stop": "eos", "length": "length"}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(setting: str, model_cfg: Mapping[str, Any] | None = None, announce: bool = True) -> str:
    """``sampling.backend`` as it will run: ``vllm`` only when vllm imports and the model has weights on disk/hub.

    ``announce``: log the choice (a fallback as a warning).
    """
    say = (lambda level, *args: log.log(level, *args)) if announce else (lambda level, *args: None)
    if setting not in BACKENDS:
        raise ValueError(f"sampling.backend={setting!r}: expected one of {', '.join(BACKENDS)}")
    if setting == "transformers":
        return setting
    if not vllm_available():
        say(logging.WARNING, "sampling.backend=vllm but vllm is not installed (pip install -e \".[vllm]\"): "
            "sampling with the transformers backend")
        return "transformers"
    if model_cfg is not None and model_cfg.get("random_init"):
        say(logging.WARNING, "sampling.backend=vllm cannot load a randomly initialised model (model=%s): "
            "sampling with the transformers backend", model_cfg.get("name"))
        return "transformers"
    say(logging.INFO, "sampling with the vllm backend")
    return "vllm"


def sampling_params(settings: DecodeSettings, seed: int, stop_ids: int | Sequence[int],
                    params_class: Callable[..., Any]) -> Any:
    """vLLM ``SamplingParams`` for one prompt: ``settings`` field for field, the prompt's own ``seed``, and
    ``stop_ids`` (one id or several: ``mipo.data.chat.stop_token_ids``) as ``stop_token_ids``."""
    return params_class(
        n=1,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k if settings.top_k else -1,
        max_tokens=settings.max_new_tokens,
        min_tokens=0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=seed,
        stop_token_ids=[stop_ids] if isinstance(stop_ids, int) else list(stop_ids),
        ignore_eos=False,
        skip_special_tokens=True,
        detokenize=False,  # the text is decoded by the tokenizer, as in mipo.model.generation
    )


class VLLMGenerator:
    """Decodes chunks of a ``Plan`` with a vLLM engine: ``generate_chunk`` matches
    ``mipo.model.generation.DecodeLoop.generate_chunk``.

    Args:
        engine: a ``vllm.LLM`` (or a stand-in with the same ``generate(prompts, sampling_params)``).
        params_class: ``vllm.SamplingParams`` (or a stand-in).
    """

    def __init__(self, engine: Any, tokenizer: Any, params_class: Callable[..., Any]):
        self.engine, self.tokenizer, self.params_class = engine, tokenizer, params_class

    @classmethod
    def load(cls, model_cfg: Mapping[str, Any], tokenizer: Any, dtype: str, seed: int,
             cache_dir: str | None = None, max_model_len: int | None = None) -> "VLLMGenerator":
        """A ``vllm.LLM`` on this rank's GPU for the weights ``mipo.model.loading.load_model`` would load."""
        import vllm

        from mipo.model.loading import _pretrained_source

        source, kwargs = _pretrained_source(model_cfg, cache_dir)
        engine = vllm.LLM(model=source, revision=kwargs.get("revision"), tokenizer=source, dtype=dtype, seed=seed,
                          trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
                          max_model_len=max_model_len, generation_config="vllm")
        return cls(engine, tokenizer, vllm.SamplingParams)

    def requests(self, plan: Plan, chunk: int, settings: DecodeSettings, seed: int) -> tuple[list[dict], list[Any]]:
        """The prompts (token ids, as rendered by the plan) and per-prompt ``SamplingParams`` of chunk ``chunk``."""
        index = plan.chunks[chunk]
        prompts = [{"prompt_token_ids": list(plan.prompts[i].ids)} for i in index]
        stops = stop_token_ids(self.tokenizer)
        params = [sampling_params(settings, row_seed(seed, i), stops, self.params_class) for i in index]
        return prompts, params

    def generate_chunk(self, plan: Plan, chunk: int, settings: DecodeSettings, seed: int = 0,
                       progress: Any = None) -> list[Generation]:
        """Chunk ``chunk``'s responses in the chunk's order."""
        prompts, params = self.requests(plan, chunk, settings, seed)
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        generations = [self.to_generation(output, plan.prompts[i].cut)
                       for output, i in zip(outputs, plan.chunks[chunk], strict=True)]
        if progress is not None:
            progress.update(len(generations))
        return generations

    def to_generation(self, output: Any, prompt_cut: int) -> Generation:
        """One vLLM ``RequestOutput`` as a ``Generation`` (the stop id is not part of the response)."""
        completion = output.outputs[0]
        reason = FINISH_REASONS.get(completion.finish_reason)
        if reason is None:
            raise ValueError(f"vllm finished a request with finish_reason={completion.finish_reason!r}; expected "
                             f"one of {sorted(FINISH_REASONS)}")
        tokens: Sequence[int] = list(completion.token_ids)
        if reason == "eos" and tokens and tokens[-1] in stop_token_ids(self.tokenizer):
            tokens = tokens[:-1]
        return Generation(_decode_text(self.tokenizer, tokens), reason, len(tokens), prompt_cut)

    def generate_plan(self, plan: Plan, settings: DecodeSettings, seed: int = 0) -> Generations:
        """Every chunk of ``plan`` (under torchrun: this rank's chunks, gathered on every rank), in input order."""
        mine = plan.shard(distributed.rank(), distributed.world_size())
        done = distributed.gather_dict({chunk: self.generate_chunk(plan, chunk, settings, seed) for chunk in mine})
        return assemble(plan, done, {**generation_record(settings, seed, plan), "backend": "vllm"})


def generate(generator: VLLMGenerator, prompts: Sequence[Messages], settings: DecodeSettings,
             planning: PlanSettings = PlanSettings(), seed: int = 0) -> Generations:
    """``mipo.model.generation.generate`` through vLLM: the same prompt rendering and plan, one response per prompt
    in the order of ``prompts``. The engine batches a chunk itself: ``planning.batch_size`` is not used (a plan of
    one batch per chunk). (``evaluate.py`` does not call it: evaluation generation always runs
    ``mipo.model.generation``'s decode loop.)"""
    plan = replace(planning, batch_size=len(prompts) or 1).plan(generator.tokenizer, prompts, settings.max_new_tokens)
    return generator.generate_plan(plan, settings, seed)
