"""Which precision a run uses, and that autocast is what applies it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_dist import precision
from ssl_dist.losses import info_nce_loss, nt_xent_loss

pytestmark = pytest.mark.unit


def test_resolve() -> None:
    cpu = torch.device("cpu")
    native = precision.cpu_has_native_bf16()
    assert precision.resolve("auto", cpu) == ("bf16" if native else "fp32")
    assert precision.resolve("bf16", cpu) == "bf16"  # explicit bf16 is honoured, even emulated
    assert precision.resolve("fp32", "cpu") == "fp32"
    if not torch.cuda.is_available():
        assert precision.native_bf16(torch.device("cuda")) is False
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        precision.resolve("fp16", cpu)


def test_describe_names_the_choice_and_why() -> None:
    line = precision.describe("auto", "cpu")
    assert line.startswith("precision: ") and "auto: bf16 is" in line
    assert torch.backends.cpu.get_cpu_capability() in line
    assert "fp32 weights" in precision.describe("bf16", "cpu")


def test_autocast_runs_matmuls_in_bf16_with_fp32_weights() -> None:
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with precision.autocast("cpu", "bf16"):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with precision.autocast("cpu", "fp32"):
        assert layer(x).dtype == torch.float32


def test_losses_stay_fp32_under_autocast() -> None:
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    reference = nt_xent_loss(z1, z2, 0.1, gather=False)
    with precision.autocast("cpu", "bf16"):
        loss = nt_xent_loss(z1, z2, 0.1, gather=False)
        moco = info_nce_loss(z1, z2, 0.1, queue=torch.randn(5, 8, generator=gen))
    assert loss.dtype == moco.dtype == torch.float32
    # With autocast on inside, the logits' matmul would run in bf16 (error ~1e-2 at T = 0.1).
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
