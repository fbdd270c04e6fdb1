"""Sparse mixture-of-experts backbones as sub-MoEs: a client materialises only the experts it holds.

The Hugging Face MoE blocks are kept and shrunk in place: a block's stacked expert tensors (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE: ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``) or its
expert modules (Switch Transformers: ``experts.expert_<j>.wi`` / ``wo``) are replaced by those of the held
experts only, the router's weight keeps only their rows, and the block's expert count and top-k follow. Each
block remembers its local -> global expert id map. A block that holds every expert is the unmodified model.

One idea per module:

* :mod:`.families`: the supported block families, their routers and held expert ids;
* :mod:`.lora_experts`: LoRA on the experts of a fused block (:class:`LoRAExperts`);
* :mod:`.parameters`: which parameters travel (experts, router rows, dense) and which train;
* :mod:`.submoe`: the sub-MoE payload: read, load, and the wire <-> parameter views;
* :mod:`.recorder`: routing observed by router hooks (balance and z losses, token counts);
* :mod:`.upcycling`: sparse upcycling of a dense Llama-family model.
"""

from fedhmoe.models.moe.families import (
    FAMILIES,
    MoEFamily,
    block_family,
    held_experts,
    is_moe_model,
    moe_blocks,
    num_global_experts,
)
from fedhmoe.models.moe.lora_experts import LoRAExperts, add_expert_lora, init_expert_lora_state
from fedhmoe.models.moe.parameters import (
    dense_parameters,
    expert_param_count,
    has_expert_lora,
    moe_layout,
    trainable_parameters,
)
from fedhmoe.models.moe.recorder import MoERecorder, install_recorder, recorder
from fedhmoe.models.moe.submoe import (
    MoEStateError,
    expert_key,
    held_from_keys,
    load_submoe,
    param_view,
    read_submoe,
    router_key,
    wire_view,
)
from fedhmoe.models.moe.upcycling import upcycle_llama, upcycled_config

__all__ = [
    "FAMILIES",
    "LoRAExperts",
    "MoEFamily",
    "MoERecorder",
    "MoEStateError",
    "add_expert_lora",
    "block_family",
    "dense_parameters",
    "expert_key",
    "expert_param_count",
    "has_expert_lora",
    "held_experts",
    "held_from_keys",
    "init_expert_lora_state",
    "install_recorder",
    "is_moe_model",
    "load_submoe",
    "moe_blocks",
    "moe_layout",
    "num_global_experts",
    "param_view",
    "read_submoe",
    "recorder",
    "router_key",
    "trainable_parameters",
    "upcycle_llama",
    "upcycled_config",
    "wire_view",
]
