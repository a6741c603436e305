"""bench/layer_memory.py's arithmetic: per token per layer is a double difference (depth 2 - depth 1, batch 2 -
batch 1), so constant terms (embeddings, the final layer, weight copies) cancel and only per-token bytes remain."""
from ristretto.bench.layer_memory import KIB, per_layer


def test_per_layer_keeps_only_what_grows_with_layers_and_tokens():
    frames, tokens = 2, 2 * 64
    per_token_layer, weights_layer, per_token_rest, constant = 5000, 70_000, 900, 123_456

    def fake_saved(depth: int, batch: int) -> int:
        return (depth * (batch * tokens * per_token_layer + weights_layer)
                + batch * tokens * per_token_rest + constant)

    row = per_layer(fake_saved, frames)
    assert row["KiB per token"] == per_token_layer / KIB
    assert row["KiB per token incl. weights"] == (tokens * per_token_layer + weights_layer) / tokens / KIB
