"""FSDP2's mixed precision leaves the micro-batch alone: the fp32 reference log-probs reach the loss unrounded.

FSDP2's default ``MixedPrecisionPolicy(cast_forward_inputs=True)`` casts every floating tensor among the
root's forward inputs to ``param_dtype``. The training micro-batch carries log pi_ref (fp32, about -2700 for
a long response of a 1B model, where bf16 values are 16 apart), so a bf16 run compared the policy with a
reference rounded by up to 8 nats. Run in a subprocess: one gloo rank, FSDP2 with bf16 parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers import ROOT

SCRIPT = textwrap.dedent(
    """
    import os, socket, torch, torch.distributed as dist
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from mipo.data.pairs import PreferencePair
    from mipo.training import objectives, parallel
    from mipo.training.forward import ReferenceLogps, TrainingForward, encode_training_rows
    from tests.helpers import tiny_model, tiny_tokenizer, user

    seen = []
    dpo = objectives.OBJECTIVES["sigmoid"]
    def spy(inputs, loss_cfg):
        seen.append(inputs.reference_logps.detach().clone())
        return dpo.pair_losses(inputs, loss_cfg)
    objectives.OBJECTIVES["sigmoid"] = objectives.Objective(dpo.family, spy)

    tokenizer = tiny_tokenizer()
    policy = tiny_model(tokenizer)
    pairs = [PreferencePair(user("What is 2 + 2?"), "4", "Paris."), PreferencePair(user("A fruit?"), "Apple.", "Five.")]
    rows = encode_training_rows(tokenizer, pairs, "sigmoid", 128, 64)
    reference = ReferenceLogps(torch.tensor([-2700.3, -2711.7]), torch.tensor([-2693.1, -2689.9]), path=None,
                               cache_hit=True)
    cfg = {"trainer": {"share_prompt": "auto", "shared_attention": "auto"}, "kernel": "torch", "fused_lm_head": True}
    forward = parallel.wrap(policy, TrainingForward.prepare(cfg, policy, torch.bfloat16), "fsdp", torch.device("cpu"),
                            mixed_precision=torch.bfloat16)
    batch = forward.collate_rows(rows, [0, 1], reference, tokenizer.pad_token_id, "sigmoid")
    loss, metrics = forward(policy, batch, {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0})
    got = seen[0]
    assert got.dtype == torch.float32, got.dtype
    assert torch.equal(got, torch.tensor([[-2700.3, -2693.1], [-2711.7, -2689.9]])), got.tolist()
    dist.destroy_process_group()
    print("ok")
    """
)


def test_fsdp_mixed_precision_keeps_the_reference_logps_in_fp32():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
