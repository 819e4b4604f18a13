"""train.optimizer = "adamw8bit": AdamW with both moments held in 8 bits, block-wise (Dettmers et al. 2022,
arXiv:2110.02861), through torchao 0.18's low-bit optimizer state (the `adamw8bit` extra).

State per parameter tensor, on each rank's shard: exp_avg and exp_avg_sq as torchao's OptimState8bit (one uint8
code a value, signed and unsigned dynamic maps, one fp32 scale per 256 values: 2 + 8/256 bytes a parameter for
the pair), wrapped in a DTensor like the shard itself, and one fp32 step count. torchao keeps a shard in fp32
(8 bytes a parameter) when it holds fewer than 4,096 values or a count not divisible by 256 (norm weights, an
uneven last shard): plan.memory.adamw8bit_state_bytes counts both cases. Each update dequantizes a moment to
fp32, applies AdamW's formulas exactly as torch's AdamW (decoupled weight decay lr·wd·p, bias corrections),
and quantizes it back; clipping is the trainer's, before the step, as with AdamW.

Why torchao, not bitsandbytes: bitsandbytes' AdamW8bit allocates its state as plain tensors beside FSDP2's
DTensor parameters and its update op has no DTensor rule ("bitsandbytes.optimizer_update_8bit_blockwise.default
got mixed torch.Tensor and DTensor", bitsandbytes 0.50.2 on gloo, checked); torchao builds its state as
DTensors of the shard's layout, and DCP saves and restores them as they are (checkpoint resume is bitwise:
tests/test_adamw8bit.py).

Why a subclass: torchao's step runs its update through torch.compile, which on CPU builds C++ with inductor
for every parameter shape (minutes on 2 cores, and a compiler the CPU machines may not have). Off CUDA the
same update function runs eagerly: the same arithmetic, op by op. And torchao keeps lr as a tensor in the
param groups, which LambdaLR's state_dict then carries into the checkpoint's JSON trainer state.
"""

from __future__ import annotations

import torch
from torchao.optim import AdamW8bit as _TorchaoAdamW8bit
from torchao.optim.adam import single_param_adam


class AdamW8bit(_TorchaoAdamW8bit):
    """torchao's AdamW8bit (block size 256) with two changes. Its update runs eagerly off CUDA (compiled on
    CUDA, as torchao runs it). And `lr` stays a float in the param groups, as in torch's AdamW, so the
    LambdaLR schedule and its state_dict (JSON in checkpoints) are AdamW's; each step hands torchao's update
    the lr as a 0-dim fp32 tensor, which is what torchao stores it as (a float would recompile per value)."""

    def add_param_group(self, param_group: dict) -> None:
        torch.optim.Optimizer.add_param_group(self, param_group)  # not torchao's, which makes lr a tensor

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = torch.tensor(group["lr"], dtype=torch.float32)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # torchao's layout and names: its checkpoints and ours are the same
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = self._new_buffer(p, True)
                    state["exp_avg_sq"] = self._new_buffer(p, False)
                state["step"] += 1
                update = _COMPILED if p.device.type == "cuda" else single_param_adam
                beta1, beta2 = group["betas"]
                # fmt: off
                update(
                    p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None, lr,
                    beta1, beta2, group["weight_decay"], group["eps"], True, False,
                )
                # fmt: on
        return loss


# torchao's own choice on CUDA: one graph per parameter shape, lr and step as tensors so values never recompile
_COMPILED = torch.compile(single_param_adam, fullgraph=True, dynamic=False)


def build_adamw8bit(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> AdamW8bit:
    return AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
