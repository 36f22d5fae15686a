"""What tandem serves: configs whose attention the paged executor computes exactly as the model
defines it. Anything else is refused here, by name of the feature, rather than run wrongly."""

from __future__ import annotations

from tandem.engine.errors import UnsupportedModelError


def context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError("context_length", "the config names no maximum sequence length")


def check_supported(config) -> None:
    """Refuse configs whose attention our paged kernel would compute differently."""
    text = getattr(config, "get_text_config", lambda: config)()
    max_len = context_length(text)
    if getattr(text, "attn_logit_softcapping", None):
        raise UnsupportedModelError("attn_logit_softcapping", "attention logit softcapping")
    layer_types = set(getattr(text, "layer_types", None) or [])
    if layer_types - {"full_attention", "sliding_attention"}:
        other = sorted(layer_types - {"full_attention", "sliding_attention"})
        raise UnsupportedModelError("layer_types", f"layers of type {other}")
    window = getattr(text, "sliding_window", None)
    windowed = "sliding_attention" in layer_types or (window and getattr(text, "use_sliding_window", True))
    # A window as long as the context changes nothing; the attention function checks that too.
    if windowed and window and window < max_len:
        raise UnsupportedModelError("sliding_window", f"window of {window} tokens < context length {max_len}")
    if getattr(text, "attention_chunk_size", None):
        raise UnsupportedModelError("attention_chunk_size", "chunked local attention")
    if getattr(text, "kv_lora_rank", None) or getattr(text, "v_head_dim", None):
        raise UnsupportedModelError("multi_latent_attention", "MLA / separate value head dimension")
    if getattr(text, "alibi", False) or getattr(text, "use_alibi", False):
        raise UnsupportedModelError("alibi", "ALiBi position biases")
    if getattr(text, "use_bidirectional_attention", False):
        raise UnsupportedModelError("use_bidirectional_attention", "bidirectional attention")
