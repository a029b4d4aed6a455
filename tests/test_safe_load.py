"""Safe loading: weights_only with an explicit allow-list; nothing else is unpickled."""

from __future__ import annotations

import argparse
import pickle
import signal
from pathlib import Path, PurePosixPath

import pytest
import torch
from megatron_fixtures import (
    CODEC,
    RunsCodeOnLoad,
    dac_generator_tensors,
    megatron_args,
    write_lightning_checkpoint,
)

from khala_cli.weights.safe_load import (
    CheckpointReadError,
    Placeholder,
    UnsafeCheckpointError,
    allowed_names,
    safe_dcp_metadata,
    safe_torch_load,
)


def test_megatron_args_with_real_enums_load(tmp_path):
    args = megatron_args(300, data_cache=PurePosixPath("/cache"), exit_signal=signal.SIGTERM)
    path = tmp_path / "common.pt"
    torch.save({"args": args, "iteration": 7, "checkpoint_version": 3.0}, path)
    got = safe_torch_load(path)
    a = got["args"]
    assert isinstance(a, argparse.Namespace) and got["iteration"] == 7
    assert a.hidden_size == args.hidden_size and a.params_dtype is torch.bfloat16
    # Megatron enums: inert placeholders carrying their value (or the real enum when
    # megatron-core, imported, has registered its own classes as safe).
    assert a.model_type.value == args.model_type.value
    assert "ModelType" in repr(a.model_type) and "AttnBackend" in repr(a.attention_backend)
    assert a.data_cache == PurePosixPath("/cache") and a.exit_signal == signal.SIGTERM


_WITHOUT_MEGATRON = """
import json, sys
sys.modules["megatron"] = None  # `import megatron...` now fails: megatron-core is missing
from khala_cli.weights.safe_load import Placeholder, safe_torch_load
args = safe_torch_load(sys.argv[1])["args"]
out = {}
for name in sys.argv[2:]:
    v = getattr(args, name)
    out[name] = [isinstance(v, Placeholder), type(v).__name__, repr(v), getattr(v, "value", None)]
print(json.dumps(out))
"""


def load_without_megatron(path: Path, *names: str) -> dict:
    """Load a checkpoint in a child process where megatron cannot be imported."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _WITHOUT_MEGATRON, str(path), *names],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_megatron_enums_load_as_placeholders_when_megatron_is_missing(tmp_path):
    args = megatron_args(300)
    path = tmp_path / "common.pt"
    torch.save({"args": args}, path)
    got = load_without_megatron(path, "model_type", "attention_backend")
    for name in ("model_type", "attention_backend"):
        is_placeholder, _, text, value = got[name]
        assert is_placeholder, got[name]
        assert value == getattr(args, name).value
    assert "ModelType" in got["model_type"][2] and "AttnBackend" in got["attention_backend"][2]


def test_placeholders_stand_in_for_missing_classes(tmp_path):
    """An enum of a Megatron version that is not installed still loads, inertly."""
    import pickletools  # noqa: F401  (documents that the pickle is plain protocol 2)

    class Fp8Recipe:  # pickled under Megatron's name, without Megatron
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            return (Fp8Recipe, (self.value,))

    Fp8Recipe.__module__, Fp8Recipe.__qualname__ = "megatron.core.enums", "Fp8Recipe"
    import megatron.core.enums as enums

    saved = getattr(enums, "Fp8Recipe", None)
    enums.Fp8Recipe = Fp8Recipe
    try:
        torch.save({"args": argparse.Namespace(fp8_recipe=Fp8Recipe("delayed"))}, tmp_path / "c.pt")
    finally:
        if saved is not None:
            enums.Fp8Recipe = saved
    got = safe_torch_load(tmp_path / "c.pt")["args"].fp8_recipe
    assert got.value == "delayed"
    # and where megatron-core is not installed at all
    (is_placeholder, _, text, value), = load_without_megatron(tmp_path / "c.pt",
                                                              "fp8_recipe").values()
    assert is_placeholder and value == "delayed" and "Fp8Recipe" in text


def test_lightning_checkpoint_with_omegaconf_hparams_loads(tmp_path):
    path = write_lightning_checkpoint(tmp_path / "dac.ckpt", dac_generator_tensors(CODEC))
    ck = safe_torch_load(path, mmap=True)
    assert ck["global_step"] == 2490000
    assert any(k.startswith("generator.decoder.") for k in ck["state_dict"])
    hp = ck["hyper_parameters"]["configs"]
    assert isinstance(hp, Placeholder) and "DictConfig" in type(hp)._qualname


@pytest.mark.parametrize("legacy", [False, True])
def test_object_outside_allow_list_is_refused(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.ones(2), "hook": RunsCodeOnLoad(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as e:
        safe_torch_load(path)
    msg = str(e.value)
    assert str(path) in msg and "--trust-checkpoint" in msg and "_touch_marker" in msg
    assert not marker.exists()
    # With trust, the user accepts the risk: the file's code runs.
    got = safe_torch_load(path, trust=True)
    assert torch.equal(got["weights"], torch.ones(2)) and marker.exists()


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="truncated"):
        safe_torch_load(path)
    with pytest.raises(CheckpointReadError, match="not found"):
        safe_torch_load(tmp_path / "nope.pt")


def test_dcp_metadata_restricted(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.bfloat16)},
             storage_writer=dcp.FileSystemWriter(str(tmp_path / "ck")), no_dist=True)
    meta = tmp_path / "ck" / ".metadata"
    md = safe_dcp_metadata(meta)
    assert set(md.state_dict_metadata) == {"w", "b"}
    marker = tmp_path / "ran"
    md.planner_data["x"] = RunsCodeOnLoad(marker)
    with open(meta, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UnsafeCheckpointError, match="_touch_marker"):
        safe_dcp_metadata(meta)
    assert not marker.exists()
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(CheckpointReadError, match="truncated"):
        safe_dcp_metadata(meta)


def test_allow_list_is_explicit_and_harmless():
    names = allowed_names()
    assert "argparse.Namespace" in names
    assert "megatron.core.transformer.enums.AttnBackend" in names
    assert "megatron.core.enums.ModelType" in names
    for dangerous in ("builtins.eval", "builtins.exec", "builtins.getattr", "os.system",
                      "subprocess.Popen", "builtins.__import__", "posix.system"):
        assert dangerous not in names
    # pathlib classes are allowed (constructing one runs nothing); Path itself is one of them
    assert {"pathlib.Path", "pathlib.PosixPath", "pathlib.PurePosixPath"} <= names
    assert "pathlib.Path.write_text" not in names
