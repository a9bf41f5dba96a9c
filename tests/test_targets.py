"""Target presets: every shipped preset loads and makes a TVM target; bad input fails clearly."""

import dataclasses
import json
import os
from importlib.resources import files

import pytest
import tvm
from tvm.target import codegen

from tvmq.errors import TvmqError
from tvmq.targets import TargetPreset, get_target, list_targets

REQUIRED = {
    "host",
    "x86-avx2",
    "x86-avx512-vnni",
    "x86-amx",
    "rasp4b",
    "arm-a76",
    "cuda-sm80",
    "cuda-sm90",
    "jetson-orin-gpu",
}
PRESETS = {preset.name: preset for preset in list_targets()}


def test_required_presets_ship():
    assert set(PRESETS) >= REQUIRED


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_makes_tvm_target(name):
    preset = get_target(name)
    target = preset.tvm_target()
    assert isinstance(target, tvm.target.Target)
    assert preset.kind == target.kind.name
    assert preset.kind in ("llvm", "cuda")
    assert preset.device_type == ("cuda" if preset.kind == "cuda" else "cpu")
    assert preset.description and "\n" not in preset.description
    if preset.kind == "cuda":
        # Started from a tag: the limits dlight and MetaSchedule need are there.
        assert int(target.attrs["max_threads_per_block"]) > 0
        assert int(target.attrs["max_shared_memory_per_block"]) > 0
        assert target.host is not None and target.host.kind.name == "llvm"
    else:
        assert codegen.llvm_cpu_has_features(list(preset.features), target)


@pytest.mark.parametrize(
    ("name", "arch"),
    [("cuda-sm80", "sm_80"), ("cuda-sm90", "sm_90a"), ("jetson-orin-gpu", "sm_87")],
)
def test_cuda_arch(name, arch):
    assert str(get_target(name).tvm_target().attrs["arch"]) == arch


@pytest.mark.parametrize(
    ("name", "feature"),
    [
        ("x86-avx2", "avx2"),
        ("x86-avx512-vnni", "avx512vnni"),
        ("x86-amx", "amx-int8"),
        ("rasp4b", "neon"),
        ("arm-a76", "dotprod"),
    ],
)
def test_cpu_feature(name, feature):
    preset = get_target(name)
    assert feature in preset.features
    assert codegen.llvm_cpu_has_features(feature, preset.tvm_target())


def test_rasp4b_is_64_bit():
    target = get_target("rasp4b").tvm_target()
    assert str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert not codegen.llvm_cpu_has_features("dotprod", target)


def test_host_is_detected():
    preset = get_target("host")
    target = preset.tvm_target()
    assert str(target.attrs["mcpu"]) == codegen.llvm_get_system_cpu()
    assert int(target.attrs["num-cores"]) == len(os.sched_getaffinity(0))
    assert "detect" not in json.dumps(dict(preset.target))
    assert not preset.is_cross_compiled
    assert preset.features == tuple(
        f for f in preset.features if codegen.llvm_cpu_has_features(f, target)
    )


def test_host_gets_the_features_a_vm_cpu_model_hides(monkeypatch):
    """A hypervisor may name a Sapphire Rapids "rocketlake" (no AMX, no AVX512-BF16 in LLVM's
    tables): the host preset adds what /proc/cpuinfo lists, AMX only where the OS grants it."""
    import tvmq.targets as targets

    cpu = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "rocketlake"}
    flags = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"})
    monkeypatch.setattr(targets, "cpu_flags", lambda: flags)
    monkeypatch.setattr(targets, "this_machine", lambda: "x86_64")
    monkeypatch.setattr(targets, "amx_granted", lambda: True)
    assert targets._hidden_features(cpu) == ["avx512bf16", "amx-tile", "amx-int8"]
    monkeypatch.setattr(targets, "amx_granted", lambda: False)
    assert targets._hidden_features(cpu) == ["avx512bf16"]
    assert targets._hidden_features({**cpu, "mcpu": "sapphirerapids"}) == []
    assert targets._hidden_features({**cpu, "mtriple": "aarch64-linux-gnu"}) == []


def test_cross_compiled():
    assert get_target("rasp4b").is_cross_compiled
    assert get_target("jetson-orin-gpu").is_cross_compiled
    assert get_target("jetson-orin-gpu").cpu_triple == "aarch64-linux-gnu"
    assert not get_target("host").is_cross_compiled


def test_unknown_name_lists_known():
    with pytest.raises(TvmqError) as info:
        get_target("no-such-board")
    message = str(info.value)
    assert "no-such-board" in message
    for name in REQUIRED:
        assert name in message


def test_preset_passes_through():
    preset = get_target("rasp4b")
    assert get_target(preset) is preset


def test_preset_is_immutable_and_hashable():
    preset = get_target("arm-a76")
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.cc = "gcc"
    with pytest.raises(TypeError):
        preset.target["mcpu"] = "cortex-a53"
    assert hash(preset) == hash(get_target("arm-a76"))
    assert preset == get_target("arm-a76")


def _preset_dict(name="my-board"):
    """A copy of the shipped rasp4b preset's JSON, renamed."""
    data = json.loads((files("tvmq._targets") / "rasp4b.json").read_text())
    data["name"] = name
    return data


def _write(tmp_path, data, name="board.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_load_from_path(tmp_path):
    data = _preset_dict()
    data["target"]["mcpu"] = "cortex-a53"
    path = _write(tmp_path, data)
    for spec in (path, str(path)):
        preset = get_target(spec)
        assert isinstance(preset, TargetPreset)
        assert preset.name == "my-board"
        assert str(preset.tvm_target().attrs["mcpu"]) == "cortex-a53"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("cc"), "cc"),
        (lambda d: d.update(features="neon"), "features"),
        (lambda d: d.update(features=["dotprod"]), "features"),
        (lambda d: d.update(target={"mcpu": "cortex-a72"}), "target"),
        (lambda d: d["target"].update(mcpu="cortex-z99"), "target"),
        (lambda d: d["target"].update(bogus=1), "target"),
        (lambda d: d.update(host="llvm"), "host"),
        (lambda d: d.update(description="two\nlines"), "description"),
        (lambda d: d.update(colour="red"), "colour"),
    ],
)
def test_malformed_file_names_file_and_field(tmp_path, change, field):
    data = _preset_dict()
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(TvmqError) as info:
        get_target(path)
    assert str(path) in str(info.value)
    assert repr(field) in str(info.value)


def test_invalid_json_names_file(tmp_path):
    path = _write(tmp_path, '{"name": "x",')
    with pytest.raises(TvmqError, match="not valid JSON") as info:
        get_target(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(TvmqError, match="cannot read"):
        get_target(tmp_path / "absent.json")
