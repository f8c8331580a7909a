"""Reading the files a user supplies (weights, checkpoints, pickled data) without running code from
them. Every place litplug reads such a file goes through this module.

* A safetensors file (recognised by its content, whatever its name) is read with ``safetensors``.
* A folder written by Hugging Face's ``save_pretrained`` is read through its ``model.safetensors``
  (or the shards named by ``model.safetensors.index.json``), else ``pytorch_model.bin``.
* Anything else is a torch file read with ``torch.load(weights_only=True)``: tensors, containers
  and plain values, plus the few classes Lightning checkpoints carry in ``hyper_parameters``
  (``SAFE_GLOBALS``). A file naming any other global is refused with a ``ValueError`` that names
  it; ``trust_checkpoint=True`` is the only way past that, and it runs code from the file.
* Pickled data (CIFAR-10's batches) goes through :func:`load_data_pickle`, an unpickler that
  rebuilds dicts, lists, bytes, str, numbers and numpy arrays and refuses anything else.
* Settings and records (the oracle's settings beside each model) are JSON objects read by
  :func:`load_json` (plain data; no code).

:func:`load_weights` puts a file's weights into a module: the keys' prefix is found
automatically (a Lightning checkpoint of any module holding it: ``backbone.``, ``model.``, ...),
and weights tied in the module (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) may be
stored once, as ``save_pretrained`` does.

Example:
    >>> import tempfile, os, torch
    >>> from torch import nn
    >>> from litplug.loading import load_weights
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save({"state_dict": {"model.weight": torch.ones(2, 2), "model.bias": torch.zeros(2)}}, path)
    >>> net = nn.Linear(2, 2)
    >>> load_weights(net, path)
    'model.'
    >>> net.weight.sum().item()
    4.0
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn

__all__ = ["SAFE_GLOBALS", "load_data_pickle", "load_file", "load_json", "load_state_dict", "load_weights"]

# Classes a Lightning checkpoint's ``hyper_parameters`` may hold beyond what ``torch.load``'s
# weights_only mode allows by default: paths and Lightning's AttributeDict. Rebuilding them runs no
# code from the file (a path is built from strings; AttributeDict is a dict).
SAFE_GLOBALS: list[Any] = [
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    AttributeDict,
]
_SAFE_NAMES = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS} | {
    f"pathlib.{c.__name__}" for c in SAFE_GLOBALS if c.__module__.startswith("pathlib")
}

_OPT_IN = (
    "Reading it would run code named in the file. If you trust whoever made it, pass "
    "`trust_checkpoint=True` (this runs that code), or save its weights as a state dict or a safetensors file"
)


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file: an 8-byte little-endian header size, then a JSON
    object of that size."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


def _read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    from safetensors.torch import load_file as read

    return read(str(path), device="cpu")


def _read_folder(folder: pathlib.Path, trust_checkpoint: bool) -> dict[str, Tensor]:
    """The weights of a ``save_pretrained`` folder (single file or shards)."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                if os.path.basename(shard) != shard:
                    raise ValueError(f"{index} names a shard outside its folder: {shard!r}")
                state.update(_as_state(load_file(folder / shard, trust_checkpoint), folder / shard))
            return state
        if (folder / single).is_file():
            return _as_state(load_file(folder / single, trust_checkpoint), folder / single)
    found = sorted(p.name for p in folder.iterdir())[:8]
    raise ValueError(
        f"{str(folder)!r} is a folder without model.safetensors or pytorch_model.bin (a save_pretrained "
        f"folder holds one of them); it holds {found}"
    )


def load_file(path: str | os.PathLike, trust_checkpoint: bool = False) -> Any:
    """The object in a weights file or ``save_pretrained`` folder, read without running code from it
    (see the module docstring); ``trust_checkpoint=True`` reads any torch file, running the code it
    names. Raises ``ValueError`` naming the file for a missing, unreadable or refused file."""
    p = pathlib.Path(path)
    if p.is_dir():
        return _read_folder(p, trust_checkpoint)
    if not p.is_file():
        raise ValueError(f"{str(path)!r} is neither a file nor a folder")
    if is_safetensors(p):
        try:
            return _read_safetensors(p)
        except Exception as err:  # noqa: BLE001 - a corrupt file is the user's error, named as such
            raise ValueError(f"{str(path)!r} could not be read as safetensors: {err}") from err
    if trust_checkpoint:
        return torch.load(p, map_location="cpu", weights_only=False)
    if zipfile.is_zipfile(p):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(p)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{str(path)!r} could not be read as a torch file: {err}") from err
        refused = [g for g in unsafe if g not in _SAFE_NAMES]
        if refused:
            raise ValueError(f"{str(path)!r} refers to {', '.join(refused)}, which litplug does not load. {_OPT_IN}.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a legacy (non-zip) file naming a global not allowed
        raise ValueError(f"{str(path)!r} was refused ({_unpickler_reason(err)}). {_OPT_IN}.") from err
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{str(path)!r} could not be read as a torch file or safetensors: {err}") from err


def _unpickler_reason(err: Exception) -> str:
    """The line of torch's weights-only error that names what was refused, without its advice."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _as_state(obj: Any, path: Any) -> dict[str, Tensor]:
    """The tensors of a Lightning checkpoint's ``state_dict`` or of a plain state dict."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    kind = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{str(path)!r} is neither a Lightning checkpoint nor a state dict of tensors; it holds {kind}")


def load_state_dict(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The tensors in ``path`` by name: a Lightning checkpoint's ``state_dict``, a plain state dict,
    a safetensors file or a ``save_pretrained`` folder (read with :func:`load_file`)."""
    return _as_state(load_file(path, trust_checkpoint), path)


def _top(keys: Any, n: int = 4) -> list[str]:
    """The distinct first components (``"backbone."``, ``"model."``) of some keys, in order."""
    out: list[str] = []
    for k in keys:
        head = k.split(".", 1)[0] + ("." if "." in k else "")
        if head not in out:
            out.append(head)
        if len(out) == n:
            break
    return out


def find_prefix(expected: list[str], found: Mapping[str, Any], optional: set[str] = frozenset()) -> str | None:
    """The prefix ``P`` such that ``P + k`` is a key of ``found`` for every ``k`` of ``expected``
    not in ``optional``; ``""`` first, then the shortest; ``None`` if there is none."""
    required = [k for k in expected if k not in optional] or expected
    anchor = required[0]
    candidates = sorted({k[: len(k) - len(anchor)] for k in found if k.endswith(anchor)}, key=len)
    for prefix in candidates:
        if prefix and not prefix.endswith("."):
            continue
        if all(prefix + k in found for k in required):
            return prefix
    return None


def _tied(module: nn.Module) -> dict[str, str]:
    """For each state-dict key whose tensor is another key's (weight tying), that other key."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in first:
            out[name] = first[key]
        else:
            first.setdefault(key, name)
    return out


def load_weights(module: nn.Module, path: str | os.PathLike, trust_checkpoint: bool = False) -> str:
    """Load the weights in ``path`` into ``module`` (strict: every key, every shape); returns the
    key prefix found in the file (``""``, ``"backbone."``, ``"model."``, ...).

    ``path``: a Lightning checkpoint of any module holding ``module``, a state dict, a safetensors
    file or a ``save_pretrained`` folder. Weights tied in ``module`` may be stored once. Raises a
    one-line ``ValueError`` naming the expected and the found key prefixes when no prefix fits."""
    state = load_state_dict(path, trust_checkpoint)
    own = module.state_dict()
    tied = _tied(module)
    prefix = find_prefix(list(own), state, optional=set(tied))
    if prefix is None:
        raise ValueError(
            f"{str(path)!r} does not hold the weights of {type(module).__name__}: it expects keys such as "
            f"{list(own)[:2]} (prefixes {_top(own)}), the file's keys start with {_top(state)} "
            f"(e.g. {list(state)[:2]}); no prefix P makes every P + key a key of the file"
        )
    picked = {k: state[prefix + k] for k in own if prefix + k in state}
    for k, source in tied.items():
        picked.setdefault(k, picked[source])
    for k, value in picked.items():
        if tuple(value.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{str(path)!r}: {prefix + k!r} has shape {tuple(value.shape)}, "
                f"{type(module).__name__} expects {tuple(own[k].shape)}"
            )
    module.load_state_dict(picked, strict=True)
    return prefix


# ----------------------------------------------------------------------------- pickled data
_DATA_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5's spelling of a contiguous array
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol 2 spells a bytes object
}


class _Refused(ValueError):
    pass


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _DATA_GLOBALS:
            raise _Refused(
                f"{self.path!r} refers to {module}.{name}; a data file holds only dicts, lists, bytes, str, "
                "numbers and numpy arrays, so it is not read (it could run code)"
            )
        return super().find_class(module, name)


def load_data_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a data file (e.g. a CIFAR-10 batch) allowing only dicts, lists, bytes, str, numbers
    and numpy arrays (Python 2 strings decoded as latin-1); anything else raises ``ValueError``
    naming the file."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _DataUnpickler(io.BytesIO(data), str(path)).load()
    except _Refused:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file is the same user error
        raise ValueError(f"{str(path)!r} could not be read as pickled data: {err}") from err


# ----------------------------------------------------------------------------- JSON records
def load_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path`` (a settings file, a record); a file that is not UTF-8 JSON holding
    an object raises ``ValueError`` naming it."""
    try:
        data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} could not be read as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data
