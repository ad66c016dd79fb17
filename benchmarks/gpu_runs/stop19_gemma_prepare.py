"""Device side: make the real Gemma 3 270M on the GPU machine the CPU box's model, token for token.

The GPU image's transformers (5.17) materializes a different tokenizer from the GGUF than the CPU
box's (5.24): sample 0 of niah_single_1 at 8K was 8022 context tokens there and 8149 here
(benchmarks/results/fidelity/gpu_h100/README.md), so its prompts were not ours. This script
dequantizes the GGUF once through spectralcache's own loader (``SPECTRALCACHE_GGUF``), then
replaces the config and tokenizer files with the CPU box's copies carried in the payload, and
refuses to go on unless

* every weight tensor has the CPU box's shape, sum and absolute sum (``weights_check.json``,
  written on the CPU box from its ``model.safetensors``), and
* the carried task file's first sample has the same context token count with this tokenizer.

usage: python3 stop19_gemma_prepare.py CPU_CACHE_DIR TASK_FILE.jsonl
"""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path


def main(cpu_cache: Path, task_file: Path) -> int:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from spectralcache.eval import model as model_mod
    from spectralcache.eval.tasks import token_counter

    target = model_mod.weights_dir()
    if not (target / "config.json").exists():
        target = model_mod._materialize("gemma3-270m")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copyfile(cpu_cache / name, target / name)
    with lzma.open(cpu_cache / "tokenizer.json.xz") as src, open(target / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)

    expected = json.loads((cpu_cache / "weights_check.json").read_text())
    weights = load_file(str(target / "model.safetensors"))
    bad = []
    for key, (shape, total, abs_total) in expected.items():
        t = weights.get(key)
        if t is None:
            bad.append(f"{key}: missing")
            continue
        t = t.double()
        if list(t.shape) != shape or float(t.sum()) != total or float(t.abs().sum()) != abs_total:
            bad.append(f"{key}: shape {list(t.shape)} vs {shape}, sum {float(t.sum())} vs {total}")
    extra = sorted(set(weights) - set(expected))
    print(f"weights: {len(expected)} tensors checked, {len(bad)} differ, {len(extra)} extra")
    for line in bad[:10] + [f"extra {k}" for k in extra[:10]]:
        print("  ", line)

    tok = AutoTokenizer.from_pretrained(str(target))
    sample = json.loads(task_file.open().readline())
    got = token_counter(tok)(sample["context"])
    print(
        f"tokenizer: sample {sample['id']} context {got} tokens here, {sample['context_tokens']} on the CPU box"
    )
    ok = not bad and not extra and got == sample["context_tokens"]
    print("PREPARE", "OK" if ok else "FAILED", target)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
