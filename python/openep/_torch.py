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


_raw_stream = None


def current_raw_stream(device_index):
    """The cudaStream_t address of torch's current stream on device ``device_index``.

    torch.cuda.current_stream() builds a Stream object (~8 us per call); the private
    torch._C._cuda_getCurrentRawStream returns the address directly (~0.2 us) and honours torch.cuda.stream()
    and graph capture the same way. Falls back to the public API where the private one is missing.
    """
    global _raw_stream
    if _raw_stream is None:
        torch = torch_module()
        fn = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        _raw_stream = fn if fn is not None else (lambda i: torch.cuda.current_stream(i).cuda_stream)
    return _raw_stream(device_index)
