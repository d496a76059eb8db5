#!/usr/bin/env python3
"""Every kernel of src/kernels/*.cu is loaded up front (src/kernels/load.hpp): for each ``__global__`` function
of a file, that file's ``list_<file>_kernels()`` (``list_runtime_kernels()`` for runtime_kernels.cu) must list
it (every instantiation the file launches, for a template). A kernel left out would be loaded lazily at its
first launch, which can deadlock against a spinning kernel. Exit 1 naming what is missing. CTest: check_kernel_loading (label cpu)."""
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent
missing = []
for cu in sorted((root / "src" / "kernels").glob("*.cu")):
    text = cu.read_text()
    kernels = re.findall(r"__global__\s+(?:void\s+)?(?:__launch_bounds__\([^)]*\)\s*)?(?:void\s+)?(\w+)\s*\(", text)
    if not kernels:
        continue
    fn = "list_" + (cu.stem if cu.stem.endswith("_kernels") else cu.stem + "_kernels")
    m = re.search(r"void " + fn + r"\(std::vector<KernelRef>& out\) \{(.*?)\n\}", text, re.S)
    if not m:
        missing.append(f"{cu.name}: no {fn}()")
        continue
    body = m.group(1)
    for k in kernels:
        launched = set(re.findall(re.escape(k) + r"(<[^>(]*>)?\s*(?:<<<|;|:)", text.replace(body, "")))
        loaded = set(re.findall(r"&" + re.escape(k) + r"(<[^>]*>)?\)", body))
        if not loaded:
            missing.append(f"{cu.name}: {k} is not loaded in {fn}()")
            continue
        for inst in launched - {""}:
            if inst not in loaded:
                missing.append(f"{cu.name}: {k}{inst} is launched but not loaded")
if missing:
    print("kernels not loaded up front:\n  " + "\n  ".join(missing))
    sys.exit(1)
print("every kernel of src/kernels is loaded up front")
