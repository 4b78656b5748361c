"""DeepSeekMoE: router (group-limited top-k, aux-free bias), experts (ragged | dense), the layer."""
