"""Load checkpoint pickles without running code from them.

Every `torch.load` here uses `weights_only=True` with an explicit allow-list of the globals
that the Khala download holds (the Megatron training args and what they reference, the
Lightning checkpoint's bookkeeping). Anything outside it fails with `UnsafeCheckpointError`,
whose message names the offending globals and offers `--trust-checkpoint`.

Classes that only describe training (Megatron enums, OmegaConf containers) are never
imported: the unpickler gets an inert stand-in (`Placeholder`) that records its arguments
and state and runs nothing. The DCP `.metadata` file, which torch reads with plain pickle,
is checked first with a restricted unpickler that admits only torch's own checkpoint
metadata dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import io
import pathlib
import pickle
import re
import signal
import types
import typing
from collections import OrderedDict
from pathlib import Path
from typing import Any

# torch is imported inside the functions that load: this module is imported by the parent
# (cli/models -> weights.convert), which never loads torch. numpy is imported, under a guard,
# where the allow-list is built: its classes join the list only where numpy.dtypes imports.

TRUST_HINT = (
    "If you trust where this file came from, re-run with --trust-checkpoint to load it "
    "with full pickle (this can run code stored in the file)."
)


class UnsafeCheckpointError(Exception):
    """A checkpoint pickle references a global outside the allow-list."""

    def __init__(self, path: str | Path, names: list[str] | None = None, detail: str = ""):
        self.path = str(path)
        self.names = sorted(set(names or []))
        what = ", ".join(self.names) if self.names else detail or "an unknown object"
        super().__init__(
            f"{self.path}: refusing to unpickle {what}: not on khala's allow-list of classes "
            f"a Khala checkpoint holds.\n{TRUST_HINT}"
        )


class CheckpointReadError(Exception):
    """A checkpoint file is missing, truncated or not what it claims to be."""


class Placeholder:
    """Inert stand-in for a training-only class (an enum member, a config container).

    Accepts whatever the pickle hands it and keeps it for inspection; has no behaviour.
    """

    _qualname = "Placeholder"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any):  # NEWOBJ calls cls.__new__(cls, *args)
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """For an enum member pickled as `Cls(value)`: the value."""
        return self.args[0] if self.args else None

    def __repr__(self) -> str:
        inner = ", ".join(repr(a) for a in self.args)
        return f"<{self._qualname}({inner})>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Placeholder):
            return type(self) is type(other) and self.args == other.args
        return NotImplemented

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self.args)))


def _placeholder(qualname: str) -> type[Placeholder]:
    return type(qualname.rsplit(".", 1)[-1], (Placeholder,), {"_qualname": qualname})


# Globals a Megatron `common.pt` holds (training args: enums, dtypes, paths), and those of the
# Lightning DAC checkpoint's bookkeeping (hyper-parameters as OmegaConf containers).
_PLACEHOLDER_NAMES = [
    # Megatron enums put into args (model_type, attention_backend, ...) across versions.
    "megatron.core.enums.ModelType",
    "megatron.core.enums.Fp8Recipe",
    "megatron.core.enums.Fp4Recipe",
    "megatron.core.transformer.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnType",
    "megatron.core.transformer.enums.LayerType",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.dist_checkpointing.validation.StrictHandling",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.optimizer.OptimizerConfig",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.model.enums.ModelType",
    "megatron.model.enums.AttnMaskType",
    # Lightning hyper-parameters saved from an OmegaConf config.
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.EnumNode",
    "omegaconf.nodes.PathNode",
    "omegaconf.nodes.BytesNode",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
]


def _real_allowed() -> list[tuple[Any, str]]:
    """Harmless real objects: argparse.Namespace, path classes, plain type objects."""
    allowed: list[tuple[Any, str]] = [
        (argparse.Namespace, "argparse.Namespace"),
        (pathlib.PosixPath, "pathlib.PosixPath"),
        (pathlib.PurePosixPath, "pathlib.PurePosixPath"),
        (pathlib.WindowsPath, "pathlib.WindowsPath"),
        (pathlib.PureWindowsPath, "pathlib.PureWindowsPath"),
        (pathlib.Path, "pathlib.Path"),
        (typing.Any, "typing.Any"),
        (OrderedDict, "collections.OrderedDict"),
    ]
    # What else Megatron puts into common.pt (megatron-core registers the same list):
    # args.exit_signal, SimpleNamespace configs, byte buffers, numpy RNG state arrays.
    allowed += [
        (signal.Signals, "signal.Signals"),
        (types.SimpleNamespace, "types.SimpleNamespace"),
        (io.BytesIO, "_io.BytesIO"),
    ]
    try:
        import numpy as np

        allowed += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:
                m = importlib.import_module(mod)
            except ImportError:
                continue
            allowed.append((m._reconstruct, f"{mod}._reconstruct"))
        import numpy.dtypes as npd

        for name in dir(npd):
            obj = getattr(npd, name)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                allowed.append((obj, f"numpy.dtypes.{name}"))
    except ImportError:
        pass
    # OmegaConf metadata records container element types as plain type objects.
    for t in (dict, list, tuple, set, frozenset, str, int, float, bool, bytes, object):
        allowed.append((t, f"builtins.{t.__name__}"))
    allowed.append((enum.Enum, "enum.Enum"))
    return allowed


_ALLOWED_CACHE: list[tuple[Any, str]] | None = None


def allowed_globals() -> list[tuple[Any, str]]:
    """The explicit allow-list as (object, "module.name") pairs for torch.serialization."""
    global _ALLOWED_CACHE
    if _ALLOWED_CACHE is None:
        _ALLOWED_CACHE = _real_allowed() + [(_placeholder(n), n) for n in _PLACEHOLDER_NAMES]
    return list(_ALLOWED_CACHE)


def allowed_names() -> set[str]:
    return {name for _, name in allowed_globals()}


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def safe_torch_load(path: str | Path, *, trust: bool = False, mmap: bool = False) -> Any:
    """`torch.load` on CPU; without `trust`, weights_only with khala's allow-list only."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: file not found")
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False,
                              pickle_module=_trusting_pickle(), mmap=mmap and _is_zip(path))
        except Exception as exc:  # noqa: BLE001 - any failure here is an unreadable file
            raise CheckpointReadError(
                f"{path}: cannot be read ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
    with torch.serialization.safe_globals(allowed_globals()):
        if _is_zip(path):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception as exc:  # noqa: BLE001 - a damaged zip: say so
                raise CheckpointReadError(
                    f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
                    f"the file may be truncated: download it again"
                ) from None
            if unsafe:
                raise UnsafeCheckpointError(path, unsafe)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
        except pickle.UnpicklingError as exc:
            names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
            if names:
                raise UnsafeCheckpointError(path, names) from None
            detail = next((ln.split("error:", 1)[-1].strip() for ln in str(exc).splitlines()
                           if "WeightsUnpickler error" in ln), _first_line(exc))
            raise UnsafeCheckpointError(path, detail=detail) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointReadError(
                f"{path}: cannot be read ({type(exc).__name__}: {_first_line(exc)}); "
                f"the file may be truncated or damaged: download it again"
            ) from None


def _trusting_pickle():
    """A pickle module for --trust-checkpoint: full pickle, except that the training-only
    classes of the allow-list still become placeholders (so OmegaConf, Lightning or a given
    Megatron version need not be installed)."""
    placeholders = {name: obj for obj, name in allowed_globals() if isinstance(obj, type)
                    and issubclass(obj, Placeholder)}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = placeholders.get(f"{module}.{name}")
            return found if found is not None else super().find_class(module, name)

    return types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- torch.distributed.checkpoint `.metadata` (plain pickle in torch) ---------------------

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint._extension",
    "torch.distributed.checkpoint.planner",
)
_DCP_EXACT = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Admits torch's checkpoint-metadata dataclasses and enums, dtypes, Size: nothing else."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _DCP_EXACT:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if module in _DCP_MODULES and "." not in name:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
            ):
                return obj
        raise UnsafeCheckpointError(self._path, [f"{module}.{name}"])


def safe_dcp_metadata(path: str | Path, *, trust: bool = False) -> Any:
    """Read a DCP `.metadata` file, refusing any global outside torch's metadata classes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: file not found")
    with open(path, "rb") as f:
        try:
            if trust:
                return pickle.load(f)
            return _DcpMetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure: a damaged file
            raise CheckpointReadError(
                f"{path}: cannot be read ({type(exc).__name__}: {_first_line(exc)}); "
                f"the file may be truncated: download it again"
            ) from None
