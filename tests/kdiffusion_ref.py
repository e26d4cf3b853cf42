"""k-diffusion's torch samplers as a test reference, loaded without the package's heavy __init__.

The PyPI package `k-diffusion` (0.1.1.post1) imports torchvision, clip, kornia, ... from its
__init__ and utils, none of which install beside this torch. Its `sampling.py` and `external.py`
only need `utils.append_dims` from utils, so both are loaded from the installed package's files
under a private parent package whose `utils` holds just that function. Install with
`pip install --no-deps k-diffusion torchsde trampoline torchdiffeq` (+ scipy, tqdm).

`load()` returns (sampling, external) or raises ImportError with the reason; tests turn that into
a skip.
"""

import importlib.util
import sys
import types

PARENT = "_kdiffusion_ref"


def _append_dims(x, target_dims):
    """k-diffusion utils.append_dims: appends trailing singleton dims up to target_dims."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def _load_submodule(location, name):
    full_name = f"{PARENT}.{name}"
    if full_name in sys.modules:
        return sys.modules[full_name]
    spec = importlib.util.spec_from_file_location(full_name, f"{location}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[full_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[full_name]
        raise
    return module


def load():
    """Import k-diffusion's sampling and external modules: (sampling, external)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    location = spec.submodule_search_locations[0]
    if PARENT not in sys.modules:
        parent = types.ModuleType(PARENT)
        parent.__path__ = [location]
        utils = types.ModuleType(f"{PARENT}.utils")
        utils.append_dims = _append_dims
        parent.utils = utils
        sys.modules[f"{PARENT}.utils"] = utils
        sys.modules[PARENT] = parent
    sampling = _load_submodule(location, "sampling")
    external = _load_submodule(location, "external")
    return sampling, external
