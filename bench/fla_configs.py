"""fla-core's autotuning results on this GPU, as the config files qwen35 ships
(src/qwen35/kernels/fla_configs/<GPU>/): read from Triton's cache directory, where every run on
this machine left them (fla's FLA_CACHE_RESULTS default), and written in fla's format.

    python bench/fla_configs.py --out $OUT/fla_configs   # after the runs that autotuned

bench/gpu_check.sh runs it last and packs the folder; merge what comes back into the shipped
files (entries of other shapes stay) and commit them:

    mkdir /tmp/f && tar xzf fla_configs.tgz -C /tmp/f
    for d in /tmp/f/*/; do python bench/fla_configs.py --merge "$d" \
        --out src/qwen35/kernels/fla_configs; done

(one folder per GPU, named as fla names it: NVIDIA_H200, NVIDIA_H100_80GB_HBM3, ...; merging
takes the GPU from the folder's name unless --gpu names it.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from qwen35.kernels import fla_configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write <GPU folder>/<kernel>.json to")
    ap.add_argument("--cache-dir", default=os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"))
    ap.add_argument("--gpu", default=None, help="GPU name (default: CUDA device 0's)")
    ap.add_argument("--merge", default=None,
                    help="a folder of fla config files to merge in, instead of Triton's cache")
    args = ap.parse_args()
    gpu = args.gpu
    if gpu is None and args.merge:
        gpu = Path(args.merge).name  # fla's folder name: its sanitizing leaves it as it is
    if gpu is None:
        import torch

        gpu = torch.cuda.get_device_name(0)
    if args.merge:
        found = {f.stem: json.loads(f.read_text()) for f in Path(args.merge).glob("*.json")}
    else:
        found = fla_configs.from_triton_cache(Path(args.cache_dir))
    d = fla_configs.dump(args.out, gpu, found)
    for name, content in sorted(found.items()):
        print(f"{name}: {len(content['autotune_entries'])} tuned shapes")
    print(f"{len(found)} fla kernels -> {d}")


if __name__ == "__main__":
    main()
