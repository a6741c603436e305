"""The Hopper compile check: every Triton kernel compiles for sm_90a on this CPU machine and passes its rules; the
rules fire on bad reports; launches are recorded exactly as the launchers' configuration functions say."""
import json
import os
import subprocess
import sys

import torch

from ristretto.bench import compile_check
from ristretto.bench.compile_check import blocks_per_sm, rule_failures
from ristretto.kernels import custom_ops, patch_embed as patch_embed_module
from ristretto.kernels.launch import HOPPER, INTERPRETER, recorded_launches, target_of


def test_every_triton_kernel_compiles_for_hopper_without_spills(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    done = subprocess.run([sys.executable, "-m", "ristretto.bench.compile_check", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert done.returncode == 0 and not report["failures"], report["failures"] or done.stderr[-3000:]
    compiled = {entry["kernel"] for entry in report["kernels"]}
    assert compiled >= {"_patch_embed_fwd_kernel", "_patch_embed_bwd_input_kernel", "_patch_embed_bwd_weight_kernel",
                        "_row_fwd_kernel", "_row_bwd_kernel"}
    for entry in report["kernels"]:
        assert 0 < entry["registers"] <= 255 and entry["blocks_per_sm"] >= 1, entry
    gemms = [e for e in report["kernels"] if e["gemm"] and "bfloat16" in e["arg_dtypes"]]
    assert gemms and all(e["tensor_cores"] in ("wgmma", "mma") for e in gemms)
    patch_embed = [e for e in gemms if e["kernel"].startswith("_patch_embed")]
    assert len(patch_embed) == 3 and all(e["tensor_cores"] == "wgmma" for e in patch_embed)  # Hopper's own MMA


def _entry(**changes):
    entry = {"spill_stores": 0, "spill_loads": 0, "shared_bytes": 1024, "gemm": True, "arg_dtypes": ["bfloat16"],
             "tensor_cores": "wgmma", "ptxas_warnings": []}
    return {**entry, **changes}


def test_rules_fail_spills_shared_memory_missing_tensor_cores_and_serialised_wgmma():
    assert rule_failures(_entry()) == []
    assert "spills" in rule_failures(_entry(spill_stores=8))[0]
    assert "shared memory" in rule_failures(_entry(shared_bytes=245832))[0]  # the Triton LayerNorm bwd seen elsewhere
    assert "tensor-core" in rule_failures(_entry(tensor_cores="none"))[0]
    assert rule_failures(_entry(tensor_cores="none", arg_dtypes=["float32"])) == []  # fp32 GEMMs run FMA on purpose
    warning = "ptxas warning : Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..."
    assert "serialized" in rule_failures(_entry(ptxas_warnings=[warning]))[0]


def test_blocks_per_sm_follow_sm90_limits():
    assert blocks_per_sm(254, 24576, 4) == (2, "registers")  # 8192 registers a warp: 8 warps fit
    assert blocks_per_sm(32, 0, 4) == (16, "warps")
    assert blocks_per_sm(32, 100_000, 4) == (2, "shared")


def test_recorded_launches_are_the_launchers_own_configs_and_run_nothing():
    x = torch.randn(2, 4, 8, 8)
    weight, bias = torch.randn(64, 4, 2, 2), torch.randn(64)
    with recorded_launches(HOPPER) as launches:
        assert target_of(x.device) == HOPPER
        out = custom_ops.patch_embed(x, weight, bias, None, 2)
    assert target_of(x.device) == INTERPRETER
    (launch,) = launches
    geometry = patch_embed_module._Geometry(x, weight, 2)
    expected = patch_embed_module.forward_config(geometry, torch.float32, HOPPER)
    assert launch.kernel is patch_embed_module._patch_embed_fwd_kernel
    assert launch.grid == expected.grid and launch.meta == {**expected.meta, "HAS_POS": False}
    assert launch.meta["INTERPRETED"] is False and out.shape == (2, 16, 64)


def test_every_kernel_module_has_a_case():
    launched = {launch.kernel.__name__ for launch, _ in compile_check.record_all_launches(
        compile_check.SIZES[:1], {"bf16": compile_check.PRECISIONS["bf16"]}).values()}
    assert compile_check.triton_kernels() <= launched
