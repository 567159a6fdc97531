"""Configuration of famtron's TransformerFAM for Hugging Face transformers (`model_type: famtron`).

Shipped beside the weights of an exported model (pipeline/hf/convert.py copies this file
verbatim) and loaded through `auto_map` with `trust_remote_code=True`. It needs torch and
transformers only: no megatron, DeepSpeed or famtron import.

Fields (famtron's ModelArgs name in brackets where it differs):
    vocab_size, hidden_size, num_hidden_layers [num_layers], num_attention_heads,
    num_key_value_heads [num_query_groups], intermediate_size [ffn size: SwiGLU hidden width],
    rms_norm_eps [norm_epsilon], rope_base, initializer_range [init_method_std],
    attention_kind: "fam" (feedback attention memory, fam_len > 0), "bswa" (block sliding-window
        attention, fam_len = 0) or "dense" (full causal attention; block fields unused),
    block_size (C), mem_blocks (m: previous blocks every block query sees), fam_len (F).
A value the modeling file cannot run raises one ValueError naming the config.json key.
"""

from __future__ import annotations

from transformers import PretrainedConfig

ATTENTION_KINDS = ("fam", "bswa", "dense")


class FAMtronConfig(PretrainedConfig):
    model_type = "famtron"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(  # shape: Hugging Face configs take every field as a keyword argument
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 256,
        rms_norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        initializer_range: float = 0.02,
        attention_kind: str = "fam",
        block_size: int = 64,
        mem_blocks: int = 3,
        fam_len: int = 8,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_base = rope_base
        self.initializer_range = initializer_range
        self.attention_kind = attention_kind
        self.block_size = block_size
        self.mem_blocks = mem_blocks
        self.fam_len = fam_len
        self.validate_famtron()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # The output layer is its own matrix in famtron; never tie it to the embedding.
        self.tie_word_embeddings = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_famtron(self) -> None:
        """Raise one ValueError naming the first config.json key this model cannot run."""

        def bad(key: str, why: str) -> None:
            raise ValueError(f"config.json {key}={getattr(self, key)!r}: {why}")

        if self.attention_kind not in ATTENTION_KINDS:
            bad("attention_kind", f"the famtron modeling file serves {list(ATTENTION_KINDS)} only")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "block_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(key, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            bad("hidden_size", "hidden_size / num_attention_heads must be even for rotary positions")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.mem_blocks, int) or self.mem_blocks < 0:
            bad("mem_blocks", "must be an integer >= 0")
        if not isinstance(self.fam_len, int) or self.fam_len < 0:
            bad("fam_len", "must be an integer >= 0")
        if self.attention_kind == "fam" and not 0 < self.fam_len <= self.block_size:
            bad("fam_len", f"attention_kind 'fam' needs 0 < fam_len <= block_size={self.block_size}")
        if self.attention_kind in ("bswa", "dense") and self.fam_len:
            bad("fam_len", f"attention_kind {self.attention_kind!r} has no feedback memory: fam_len must be 0")
        if not self.rope_base > 0:
            bad("rope_base", "must be positive")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", "must be positive")
