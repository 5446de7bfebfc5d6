"""A model's shapes (what memory and FLOPs depend on), from its config.json: never the weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftbridge.errors import ConfigError


@dataclass(frozen=True)
class Shapes:
    """What memory and FLOPs depend on; read from a config.json."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0 = hidden_size // num_heads
    source: str = ""

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * (self.head_dim or self.hidden_size // self.num_heads)

    @property
    def q_dim(self) -> int:
        return self.num_heads * (self.head_dim or self.hidden_size // self.num_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one Llama-style decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def decoder_linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.decoder_linear_params + self.embedding_params + self.lm_head_params + self.norm_params

    @property
    def matmul_params(self) -> int:
        """N of the 2N-per-token rule: every weight in a matmul (the LM head too, tied or not)."""
        return self.decoder_linear_params + self.vocab_size * self.hidden_size


def _llama(h: int, i: int, layers: int, heads: int, kv: int) -> Shapes:
    return Shapes(h, i, layers, heads, kv, 32000, source="known-shapes table, from its config.json")


# Hub ids whose config.json cannot be read here (gated, no network); values copied from their config.json.
KNOWN_SHAPES: dict[str, Shapes] = {
    **dict.fromkeys(
        ("meta-llama/llama-2-7b-hf", "meta-llama/llama-2-7b-chat-hf"), _llama(4096, 11008, 32, 32, 32)
    ),
    **dict.fromkeys(
        ("meta-llama/llama-2-13b-hf", "meta-llama/llama-2-13b-chat-hf"), _llama(5120, 13824, 40, 40, 40)
    ),
    **dict.fromkeys(
        ("meta-llama/llama-2-70b-hf", "meta-llama/llama-2-70b-chat-hf"), _llama(8192, 28672, 80, 64, 8)
    ),
}


def model_shapes(name_or_path: str) -> Shapes:
    """Shapes from the model's config.json: a local folder, builtin:*, the HF cache, else the known table."""
    from sftbridge.config import ModelSection
    from sftbridge.models.loading import model_path

    path = model_path(ModelSection(name_or_path=name_or_path))
    local = Path(path).is_dir()
    known = KNOWN_SHAPES.get(name_or_path.lower())
    if known is not None and not local:
        return known
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=not local)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name_or_path: no config.json for {name_or_path!r} ({exc.__class__.__name__}); point it "
            "at a local folder holding the model's config.json, or use one of: "
            + ", ".join(sorted(KNOWN_SHAPES))
        ) from None
    text = config.get_text_config()
    heads = text.num_attention_heads
    return Shapes(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        vocab_size=text.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        head_dim=getattr(text, "head_dim", None) or 0,
        source=f"config.json of {path}",
    )
