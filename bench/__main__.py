"""`ristretto-bench NAME [args]` / `python -m ristretto.bench NAME [args]`: run one benchmark by name."""
import importlib
import sys

BENCHMARKS = {
    "kernels": "Triton kernels vs torch eager / torch.compile (GB/s, fraction of copy bandwidth)",
    "attention": "attention backends at Latte's spatial / temporal / cross shapes (TFLOP/s)",
    "step": "one training step: ours vs diffusers LatteTransformer3DModel (samples/s, MFU, peak memory)",
    "loader": "clips/s out of the training DataLoader vs what the step consumes",
    "memory": "peak memory vs the planner's prediction; largest batch per checkpointing mode",
    "quality": "score a run's samples on the synthetic task (colour / direction / shape accuracy)",
    "suite": "every GPU check in one call under a time budget (environment, gpu tests, benches, parity)",
    "fp8_sensitivity": "which block linears emulated FP8 hurts most (gradient error per group of linears)",
    "loss_parity": "paired loss curves over seeds: a numerics change (FP8, kernels) vs its baseline runs",
    "compile_check": "compile every Triton kernel for sm_90a on the CPU: registers, spills, smem, tensor cores",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print("usage: ristretto-bench NAME [args]\n" + "\n".join(f"  {k:16s} {v}" for k, v in BENCHMARKS.items()),
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"ristretto.bench.{argv[0]}")
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0  # some benches return their results, not an exit code


if __name__ == "__main__":
    sys.exit(main())
