"""Model adapters: one small interface per model family (see `base.ModelAdapter`)."""

from .base import ModelAdapter, RopeSpec, UnsupportedModelError


def adapter_for(model) -> ModelAdapter:
    """Pick the adapter for a loaded model; refuses unknown families loudly."""
    if hasattr(model, "config") and hasattr(model.config, "model_type") \
            and type(model).__module__.startswith("transformers"):
        from .hf import HFAdapter

        return HFAdapter(model)
    raise UnsupportedModelError(f"no blend adapter for {type(model).__qualname__}")


__all__ = ["ModelAdapter", "RopeSpec", "UnsupportedModelError", "adapter_for"]
