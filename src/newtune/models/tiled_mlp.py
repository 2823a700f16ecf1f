"""`tiled_mlp`: each MLP runs over shards of the sequence, recomputed shard by shard in backward.

ALST (Arctic Long Sequence Training) tiles the MLP: its intermediate activations (gate, up,
act(gate) * up: several times the hidden size per token) are what long sequences run out of
memory on, and an MLP treats tokens independently, so it can run on one slice of the sequence
at a time. Forward keeps only each shard's input; backward recomputes one shard's MLP, takes
its gradients and frees it before the next, so one shard's intermediates live at a time.

Two engines, as in Axolotl:

- Under DeepSpeed, DeepSpeed's own `TiledMLP` autograd function (the library's implementation):
  its backward runs one inner backward per shard and tells ZeRO (`ds_grad_is_ready`) to reduce a
  parameter's gradient only after the last shard, and all ranks agree on the shard count (ZeRO-3
  gathers the MLP weights once per shard, a collective).
- Single process, DDP and FSDP2: `torch.utils.checkpoint` (non-reentrant) around each shard.
  No library offers tiling outside DeepSpeed (DeepSpeed's function is written for ZeRO's
  gradient hooks), and checkpointing gives it exactly: the recompute runs inside the one
  backward pass, so the autograd engine sums the shards' weight gradients before each
  parameter's AccumulateGrad runs, and DDP's / FSDP2's gradient hooks fire once per parameter,
  as without tiling (Axolotl's own variant runs one inner backward per shard instead, and must
  hold FSDP2's reshard between them).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from newtune.errors import ModelError

log = logging.getLogger(__name__)

TOKENS_PER_SHARD = 32768  # the shard size when `tiled_mlp_num_shards` is unset (as Axolotl)


def shard_count(seq_len: int, num_shards: int | None, distributed: bool) -> int:
    """Shards for a sequence: the configured count, or one per 32k tokens (under DeepSpeed all
    ranks agree on the largest: ZeRO-3 gathers the MLP weights once per shard, a collective)."""
    if num_shards is not None:
        return num_shards
    count = max(1, math.ceil(seq_len / TOKENS_PER_SHARD))
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank must run the same number of shards (ZeRO-3 gathers weights per shard)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        agreed = torch.tensor(count, device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        count = int(agreed.item())
    return count


def tiled_checkpoint(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shards: int):
    """`forward(x)` over `shards` slices of the sequence dim (-2), each recomputed in backward."""
    pieces = [p for p in torch.tensor_split(x, shards, dim=-2) if p.shape[-2]]
    if len(pieces) < 2:
        return forward(x)
    if not torch.is_grad_enabled():
        return torch.cat([forward(piece) for piece in pieces], dim=-2)
    return torch.cat([checkpoint(forward, piece, use_reentrant=False) for piece in pieces], dim=-2)


def deepspeed_tiled(inner: Callable, mlp: nn.Module, x: torch.Tensor, shards: int) -> torch.Tensor:
    """DeepSpeed's TiledMLP over `x` zero-padded to a multiple of `shards` tokens.

    DeepSpeed's backward marks a gradient ready for ZeRO only on shard number `shards`, and
    torch.chunk makes fewer pieces when the length does not divide (9 tokens in 4 shards gives 3
    pieces of 3): that shard would never come and ZeRO would never reduce the MLP's gradients.
    The MLP treats tokens independently, so padded rows change no output, and their sliced-off
    outputs get no gradient, so they add none to the weights.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    params = [p for p in mlp.parameters() if p.requires_grad]
    seq = x.shape[-2]
    pad = -seq % shards
    padded = nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    out = TiledMLP.apply(inner, mlp, padded, shards, params)
    return out[..., :seq, :] if pad else out


def generic_gated_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama's gated MLP, `down(act(gate(x)) * up(x))` (`tiled_mlp_use_original_mlp: false`)."""
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


class _Tiled:
    """The tiled forward installed on one MLP module (keeps the module's own forward)."""

    def __init__(self, mlp: nn.Module, inner: Callable, num_shards: int | None, deepspeed: bool):
        self.mlp, self.inner, self.num_shards, self.deepspeed = mlp, inner, num_shards, deepspeed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output for `x` (batch, seq, hidden) or (seq, hidden), computed in shards."""
        shards = shard_count(x.shape[-2], self.num_shards, self.deepspeed)
        if self.deepspeed:
            return deepspeed_tiled(self.inner, self.mlp, x, shards)
        return tiled_checkpoint(functools.partial(self.inner, self.mlp), x, shards)


def _is_mlp(name: str, module: nn.Module) -> bool:
    """A decoder layer's dense MLP: a module named `mlp` whose class is an *MLP."""
    return name.rsplit(".", 1)[-1] == "mlp" and type(module).__name__.endswith("MLP")


def apply_tiled_mlp(
    model: nn.Module,
    num_shards: int | None = None,
    use_original_mlp: bool = True,
    deepspeed: bool = False,
) -> int:
    """Tile every decoder MLP of `model`; the count of MLPs tiled (ModelError when none)."""
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ModelError(
            "`tiled_mlp: true` under `deepspeed` runs DeepSpeed's TiledMLP, and deepspeed is not "
            "installed; run `pip install 'newtune[deepspeed]'` (or `pip install deepspeed`)."
        )
    targets = [(n, m) for n, m in model.named_modules() if _is_mlp(n, m)]
    if not targets:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(".mlp")})
        raise ModelError(
            "`tiled_mlp: true` tiles each decoder layer's dense MLP (a `mlp` module whose class "
            f"is an ...MLP) and this model has none (its `mlp` modules: {kinds or 'none'}; "
            "mixture-of-experts blocks are not tiled); remove `tiled_mlp`."
        )
    for name, mlp in targets:
        if use_original_mlp:
            inner = type(mlp).forward
        elif all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            inner = generic_gated_forward
        else:
            raise ModelError(
                f"`tiled_mlp_use_original_mlp: false` runs Llama's gated MLP "
                f"(gate_proj/up_proj/down_proj + act_fn) and `{name}` ({type(mlp).__name__}) "
                "has no such layout; set `tiled_mlp_use_original_mlp: true`."
            )
        mlp.forward = _Tiled(mlp, inner, num_shards, deepspeed)
    engine = "DeepSpeed TiledMLP" if deepspeed else "torch checkpoint per shard"
    shards = num_shards or f"1 per {TOKENS_PER_SHARD} tokens"
    log.info("tiled_mlp: %d MLP modules tiled (%s shards, %s)", len(targets), shards, engine)
    return len(targets)
