"""TF32 for one training run only: torch's precision switches are process-wide, so a run sets
them for its own duration and gives the caller's settings back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# torch >= 2.9 keeps one `fp32_precision` per backend node; parents come before children,
# so restoring in this order gives every node its own saved value back.
_NODES = (
    "",
    "cuda.matmul",
    "cudnn",
    "cudnn.conv",
    "cudnn.rnn",
    "mkldnn",
    "mkldnn.matmul",
    "mkldnn.conv",
    "mkldnn.rnn",
)
_LEGACY = (("cuda.matmul", "allow_tf32"), ("cudnn", "allow_tf32"))


def _node(torch: Any, dotted: str) -> Any:
    node = torch.backends
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _switches(torch: Any) -> list[tuple[Any, str]]:
    """(object, attribute) of every TF32 switch this torch has."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        nodes = [_node(torch, d) for d in _NODES]
        return [(n, "fp32_precision") for n in nodes if hasattr(n, "fp32_precision")]
    return [(_node(torch, d), attr) for d, attr in _LEGACY]


@contextlib.contextmanager
def tf32_scope(enabled: bool | None) -> Iterator[None]:
    """Inside the block, CUDA matmuls and convolutions use TF32 as `tf32` says (None: as they
    are); afterwards torch's switches hold what they held before, whatever changed them inside
    (transformers' TrainingArguments also sets TF32 under torch_compile)."""
    import torch

    switches = _switches(torch)
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in switches]
    try:
        if enabled is not None and torch.cuda.is_available():
            legacy = switches[0][1] == "allow_tf32"
            targets = ("cuda.matmul", "cudnn") if legacy else ("cuda.matmul", *_NODES[2:5])
            for dotted in targets:  # cudnn's conv and rnn nodes default to tf32 on their own
                node = _node(torch, dotted)
                if legacy:
                    node.allow_tf32 = enabled
                elif node is not None:
                    node.fp32_precision = "tf32" if enabled else "ieee"
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
