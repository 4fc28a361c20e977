"""How the FSDP2 student is parallelized: small ordered steps, each taking only its own options.

Order (torchtitan style): activation checkpointing wraps each decoder layer, then ``fully_shard`` each decoder
layer, then the root (the :class:`~kdscale.student.fsdp2.module.DistillationModule`, so that the embedding, the
final norm and the output head are one FSDP unit that stays unsharded through the loss), then make gradient
reduction a SUM across ranks (the loss is already normalized by the global token count).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from kdscale.student.common import MIXED_PRECISION


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers of a Hugging Face causal LM (``model.model.layers`` for Llama/Qwen)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no decoder ModuleList at get_decoder().layers: the FSDP2 backend supports "
            "Hugging Face decoder-only causal LMs laid out like Llama/Qwen (model.model.layers)."
        )
    return layers


def apply_activation_checkpointing(model: nn.Module, *, enabled: bool) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant ``checkpoint_wrapper``), in place.

    The wrapper adds ``_checkpoint_wrapped_module`` to parameter names; the DCP state-dict helpers strip it, so
    checkpoints and HF exports are the same with and without activation checkpointing.
    """
    if not enabled:
        return
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer, preserve_rng_state=True)


def mixed_precision_policy(mixed_precision: str, *, cast_forward_inputs: bool = True) -> MixedPrecisionPolicy:
    """``none``: fp32 everywhere; ``bf16``: bf16 compute copies of the fp32 master weights, fp32 gradient reduction."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "none":
        return MixedPrecisionPolicy(cast_forward_inputs=cast_forward_inputs)
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=cast_forward_inputs
    )


def apply_fsdp(root: nn.Module, layers: nn.ModuleList, *, mesh: DeviceMesh, mixed_precision: str) -> None:
    """``fully_shard`` every decoder layer, then ``root`` (embedding, final norm, output head), in place.

    The root does not cast its floating inputs: they are the teacher's hidden states and head, which the loss
    reads in their own dtype. The decoder layers cast theirs to the compute dtype as usual.
    """
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed_precision_policy(mixed_precision))
    fully_shard(root, mesh=mesh, mp_policy=mixed_precision_policy(mixed_precision, cast_forward_inputs=False))


def sum_gradients_across_ranks(root: nn.Module) -> bool:
    """Make every FSDP unit SUM gradients across ranks instead of averaging them (FSDP2's default).

    Returns False when this torch cannot (no ``set_gradient_divide_factor`` or no
    ``set_force_sum_reduction_for_comms``): the caller must then multiply the loss by the data-parallel size
    before backward to get the same sum.

    ``set_force_sum_reduction_for_comms`` keeps the collectives plain SUMs: a divide factor of 1.0 alone selects
    ``ReduceOp.PREMUL_SUM``, which gloo does not implement.
    """
    modules = [module for module in root.modules() if isinstance(module, FSDPModule)]
    assert modules, "sum_gradients_across_ranks runs after apply_fsdp"
    setters = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms")
    if not all(hasattr(module, name) for module in modules for name in setters):
        return False
    for module in modules:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return True
