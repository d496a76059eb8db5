"""PyTorch is imported lazily: `import openep` works without it (CPU-only use: Config, size hints, reference)."""

_torch = None


def torch_module():
    """The torch module, imported on first use. Raises OpenEPError if PyTorch is missing."""
    global _torch
    if _torch is None:
        try:
            import torch
        except ImportError as e:
            from .errors import OpenEPError
            raise OpenEPError("OpenEP unsupported: openep.Buffer and events need PyTorch, which is not installed "
                              f"({e})", "unsupported") from e
        _torch = torch
    return _torch
