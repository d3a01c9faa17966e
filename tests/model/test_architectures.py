"""The architecture gate of the prompt tree (mipo/model/architecture.py) on tiny models of several families.

The tree is exact only with full causal attention in every layer. For each family: the gate's verdict; the
``Scorer``'s log-probs (mipo/model/logprobs.py) against a plain Hugging Face forward of each unpadded row;
``trainer.share_prompt`` (mipo/training/forward.py::resolve_share_prompt); and the training forward with
``share_prompt=auto`` against ``share_prompt=false`` (loss, every parameter gradient, step-0 log-probs). Windows
are 6 tokens and rows 19-25, so a window that the tree ignores shows; the test that forces the tree on the gated
families shows that it would be wrong there.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from mipo.data.encoding import EncodedRow
from mipo.model.architecture import prompt_tree_problem
from mipo.model.logprobs import Scorer, ScoringSettings, continuation_logps
from mipo.model.prompt_tree import group_by_prompt, pack_groups
from mipo.runtime.errors import ConfigError
from mipo.training.forward import (
    TrainingForward,
    collate_groups,
    continuation_batch_logps,
    micro_batch_loss,
    resolve_share_prompt,
)

VOCAB = 160
WINDOW = 6
LAYERS = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# name -> (model_type, config, what the gate's reason names; None: the tree is allowed)
ARCHITECTURES = {
    "llama": ("llama", LAYERS, None),
    "gpt_neox": ("gpt_neox", {**LAYERS, "num_key_value_heads": 4}, None),
    "qwen2_window_off": ("qwen2", {**LAYERS, "use_sliding_window": False, "sliding_window": WINDOW}, None),
    "qwen2_no_window_layer": ("qwen2", {**LAYERS, "use_sliding_window": True, "sliding_window": WINDOW,
                                        "max_window_layers": 2}, None),
    "mistral_no_window": ("mistral", {**LAYERS, "sliding_window": None}, None),
    "mistral": ("mistral", {**LAYERS, "sliding_window": WINDOW}, "Mistral's sliding_window=6"),
    "qwen2": ("qwen2", {**LAYERS, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0},
              "Qwen2's layer_types has sliding_attention layers (sliding_window=6"),
    "gemma2": ("gemma2", {**LAYERS, "sliding_window": WINDOW, "head_dim": 8},
               "Gemma2's layer_types has sliding_attention layers (sliding_window=6"),
    "gemma3": ("gemma3_text", {**LAYERS, "sliding_window": WINDOW, "head_dim": 8},
               "Gemma3's layer_types has sliding_attention layers (sliding_window=6"),
    "phi3": ("phi3", {**LAYERS, "sliding_window": WINDOW}, "Phi3's sliding_window=6"),
    "bloom": ("bloom", {"vocab_size": VOCAB, "hidden_size": 32, "n_layer": 2, "n_head": 4, "pad_token_id": 0,
                        "bos_token_id": 1, "eos_token_id": 2}, "Bloom's ALiBi"),
}
ALLOWED = [name for name, (_, _, reason) in ARCHITECTURES.items() if reason is None]
GATED = [name for name, (_, _, reason) in ARCHITECTURES.items() if reason is not None]
LOSS = {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid"}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of the family, fp32, with a sharpened output layer (log-probs far from log(1/V))."""
    model_type, overrides, _ = ARCHITECTURES[name]
    config = AutoConfig.for_model(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def rows() -> list[EncodedRow]:
    """Two prompts with two responses each (19-25 tokens a row: longer than the window), and a lone prompt."""
    generator = torch.Generator().manual_seed(7)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, VOCAB, (n,), generator=generator).tolist())

    first, second = ids(10), ids(12)
    return [EncodedRow(first, ids(11)), EncodedRow(second, ids(9)), EncodedRow(first, ids(13)),
            EncodedRow(ids(8), ids(12)), EncodedRow(second, ids(13))]


def plain_logps(model: torch.nn.Module, scored: list[EncodedRow]) -> torch.Tensor:
    """log pi(response | prompt) from ``model(input_ids).logits``, one unpadded row at a time: (b,) float32."""
    out = []
    with torch.no_grad():
        for row in scored:
            logits = model(input_ids=torch.tensor([row.input_ids])).logits[0]  # (T, V)
            token_logps = logits[len(row.prompt_ids) - 1 : -1].float().log_softmax(-1)  # (R, V): predict the response
            out.append(token_logps.gather(1, torch.tensor(row.response_ids)[:, None]).sum())
    return torch.stack(out)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_gate_verdict(name):
    problem = prompt_tree_problem(build(name))
    expected = ARCHITECTURES[name][2]
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(expected), problem
        assert "\n" not in problem


@pytest.mark.parametrize("model_type, overrides, expected", [
    ("gpt_neo", {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "window_size": WINDOW,
                 "attention_types": [[["global", "local"], 1]]},
     "GPTNeo's attention_layers has local layers (window_size=6"),
    ("gemma2", {**LAYERS, "head_dim": 8, "layer_types": ["full_attention"] * 2},
     "Gemma2's attn_logit_softcapping=50.0"),
    ("falcon", {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "alibi": True}, "Falcon's alibi=True"),
    ("falcon", {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
     # which check refuses it first depends on the transformers release (5.25: the probe; 5.17: the interface)
     ("Falcon's decoder layers do not pass the forward's keywords (prompt_tree=) on to attention",
      "Falcon's attention layers do not call transformers' AttentionInterface")),
    ("stablelm", LAYERS, "StableLm's decoder layers do not pass the forward's keywords (prompt_tree=) on to attention"),
])
def test_gate_names_the_field(model_type, overrides, expected):
    """Local attention, softcapping without a window (all layers full), ALiBi by a flag, and the probe's finding:
    decoder layers that drop the keywords the tree reaches attention by (the tree would fail there)."""
    problem = prompt_tree_problem(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **overrides)))
    assert problem is not None and problem.startswith(expected), problem


def test_gate_refuses_a_model_without_config():
    assert "not a transformers model" in prompt_tree_problem(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", [name for name in GATED if name != "bloom"])  # Bloom cannot even run the tree
def test_forced_tree_is_wrong_where_the_gate_refuses(name):
    """What the gate prevents: the tree under the model's own attention (the dense mask) differs from the rows."""
    model = build(name).eval()
    scored = rows()
    groups, order = group_by_prompt(scored)
    with torch.no_grad():
        tree = continuation_logps(model, pack_groups(groups), kernel="torch", fused_lm_head=False)
    tree = torch.empty_like(tree).index_copy_(0, torch.tensor(order), tree)
    assert (tree - plain_logps(model, scored)).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# The Scorer
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_scorer_equals_plain_forward(name, caplog):
    model = build(name)
    scorer = Scorer(model, SimpleNamespace(pad_token_id=0), ScoringSettings(batch_size=8, kernel="torch"))
    scored = rows()
    with caplog.at_level(logging.INFO, logger="mipo.model.logprobs"):
        got = scorer.score_rows(scored, desc=None)
        again = scorer.score_rows(scored[::-1], desc=None)
    want = plain_logps(model, scored)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want.flip(0), rtol=1e-5, atol=1e-5)
    assert want.std() > 1.0  # the rows really differ, so a mix-up would show
    gated = ARCHITECTURES[name][2] is not None
    assert scorer.shares_prompts is not gated
    refusals = [r.getMessage() for r in caplog.records if "not as prompt trees" in r.getMessage()]
    assert len(refusals) == (1 if gated else 0)  # once per Scorer, with the reason
    assert not gated or ARCHITECTURES[name][2] in refusals[0]


# --------------------------------------------------------------------------------------------
# The training forward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_resolve_share_prompt(name, caplog):
    model = build(name)
    gated = ARCHITECTURES[name][2] is not None
    with caplog.at_level(logging.INFO, logger="mipo.model.architecture"):
        assert resolve_share_prompt("auto", model) is not gated
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trainer.share_prompt=auto")]
    assert len(said) == gated and (not gated or ARCHITECTURES[name][2] in said[0])
    assert resolve_share_prompt(False, model) is False
    if gated:
        with pytest.raises(ConfigError, match=r"trainer\.share_prompt=true") as error:
            resolve_share_prompt(True, model)
        assert ARCHITECTURES[name][2] in str(error.value)
        cfg = OmegaConf.create({"kernel": "torch", "fused_lm_head": False,
                                "trainer": {"share_prompt": True, "shared_attention": "dense"}})
        with pytest.raises(ConfigError):  # before any forward: Gemma2's tree crashed in the forward
            TrainingForward.prepare(cfg, model)
    else:
        assert resolve_share_prompt(True, model) is True


def train_once(name: str, share_prompt):
    """One DPO micro-batch of 3 pairs through ``TrainingForward``: (loss, step-0 log-probs (b, 2), gradients)."""
    model = build(name, seed=3)
    model.train()
    softcapped = getattr(model.config, "final_logit_softcapping", None) is not None  # fused_lm_head refuses it
    cfg = OmegaConf.create({"kernel": "torch", "fused_lm_head": not softcapped,
                            "trainer": {"share_prompt": share_prompt, "shared_attention": "auto"}})
    forward = TrainingForward.prepare(cfg, model)
    scored = rows()
    chosen = [scored[0], scored[1], scored[3]]
    rejected = [scored[2], scored[4], EncodedRow(scored[3].prompt_ids, (5, 6, 7))]
    reference = torch.tensor([[-60.0, -55.0], [-40.0, -70.0], [-50.0, -52.0]])
    batch = collate_groups([chosen, rejected], [0, 1, 2], reference, 0, share_prompt=forward.share_prompt)
    with torch.no_grad():
        logps = continuation_batch_logps(model, batch.inputs, 3, kernel="torch", fused_lm_head=forward.fused_lm_head,
                                         order=batch.order)  # (3, 2)
    loss, _ = micro_batch_loss(model, batch, LOSS, kernel="torch", fused_lm_head=forward.fused_lm_head)
    loss.backward()
    want = plain_logps(build(name, seed=3), [*chosen, *rejected]).view(2, 3).T  # (3, 2)
    return forward.share_prompt, loss.detach(), logps, want, grads(model)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_training_forward_auto_equals_rows(name):
    shared, loss, logps, want, got_grads = train_once(name, "auto")
    assert shared is (ARCHITECTURES[name][2] is None)
    _, base_loss, _, _, base_grads = train_once(name, False)
    torch.testing.assert_close(logps, want, rtol=1e-5, atol=1e-5)  # step 0: the plain forward's log-probs
    torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == base_grads.keys() and len(base_grads) > 4
    for key, g in base_grads.items():
        error = (got_grads[key] - g).abs().max()
        assert error <= 1e-5 * max(g.abs().max(), 1e-8), f"gradient of {key}: max error {error:.3g}"


def test_gate_leaves_the_model_as_it_was():
    """The gate's probe (one tree forward) restores the mode, the attention implementation and the random state."""
    model = build("llama")
    model.train()
    model.set_attn_implementation("eager")
    state = torch.get_rng_state()
    assert prompt_tree_problem(model) is None
    assert model.training and model.config._attn_implementation == "eager"
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_gate_sees_through_lora_adapters(name):
    """With peft's LoRA layers injected (``mipo.model.adapters.apply_lora``: the CausalLM itself), the verdict is the
    base model's, and the Scorer still equals the plain forward (adapters made non-zero so that they count)."""
    pytest.importorskip("peft")
    from mipo.model.adapters import apply_lora

    model = apply_lora(build(name), {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    problem = prompt_tree_problem(model)
    assert problem is None if ARCHITECTURES[name][2] is None else problem.startswith(ARCHITECTURES[name][2])
    scorer = Scorer(model, SimpleNamespace(pad_token_id=0), ScoringSettings(kernel="torch"))
    torch.testing.assert_close(scorer.score_rows(rows(), desc=None), plain_logps(model, rows()), rtol=1e-5, atol=1e-5)
