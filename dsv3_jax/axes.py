"""The notation legend: one letter per dimension, used in einsum strings, shape comments,
parameter declarations and logical sharding names (../DESIGN.md, "Notation").

A letter never changes meaning. `LEGEND` is the single source: `params.py` turns a
parameter's letters into its shape and its logical axis names through it, so a label can
never drift from the dimension it describes.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Letter:
    meaning: str
    field: str | None  # the Config attribute giving its size (None: set by the data)
    logical: str  # logical axis name, mapped to mesh axes by sharding/ rule tables


LEGEND: dict[str, Letter] = {
    "B": Letter("batch", None, "batch"),
    "T": Letter("query position", None, "seq"),
    "S": Letter("key/value position", None, "kv_seq"),
    "D": Letter("model width", "dim", "embed"),
    "V": Letter("vocabulary", "vocab_size", "vocab"),
    "N": Letter("attention heads", "n_heads", "heads"),
    "Q": Letter("query latent (q LoRA rank)", "q_lora_rank", "q_latent"),
    "C": Letter("KV latent (kv LoRA rank)", "kv_lora_rank", "kv_latent"),
    "K": Letter("per-head q/k dim without RoPE", "qk_nope_head_dim", "qk_nope"),
    "R": Letter("per-head RoPE dim", "qk_rope_head_dim", "qk_rope"),
    "H": Letter("per-head value dim", "v_head_dim", "v_head"),
    "F": Letter("dense FFN width", "inter_dim", "mlp"),
    "f": Letter("routed-expert FFN width", "moe_inter_dim", "expert_mlp"),
    "s": Letter("shared-experts FFN width", "shared_inter_dim", "expert_mlp"),
    "E": Letter("routed experts", "n_routed_experts", "experts"),
    "G": Letter("expert groups", "n_expert_groups", "expert_groups"),
    "A": Letter("experts per token", "n_activated_experts", "topk"),
    "M": Letter("token rows fed to a grouped matmul", None, "tokens"),
    "L": Letter("stacked layers", None, "layers"),
    "P": Letter("MTP projection input [embedding; hidden]", "mtp_proj_in_dim", "mtp_in"),
}
"""`F` is the dense FFN width; the routed and shared experts' widths get their own letters
(`f`, `s`) because a dimension's letter must fix its size. All three are `mlp`-like logical
axes; the experts' two share `expert_mlp`."""


def logical_axes(letters: str) -> tuple[str, ...]:
    """Logical axis names of a space-separated letter string, e.g. "L Q N K"."""
    return tuple(LEGEND[c].logical for c in letters.split())
