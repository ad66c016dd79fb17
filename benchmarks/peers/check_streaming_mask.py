"""Cross-check: kvpress StreamingLLMPress (+ the driver's mask fix) vs our SinkWindowCache.

StreamingLLMPress at ratio r keeps the first 4 tokens and the last ``n - 4 - n_pruned``
of each full-attention layer after the prefill; ``SinkWindowCache(n_sink=4, window=W)``
with the same W keeps the same tokens. The prefill is exact in both, so the logits of the
question step must agree (up to float noise between transformers 5.2 and 5.23) if, and
only if, both get the attention mask right. Run the ``kvpress`` half in the kvpress venv
and the ``ours`` half in the main environment, then ``compare``::

    /tmp/kvpress-venv/bin/python benchmarks/peers/check_streaming_mask.py kvpress TASKS.jsonl OUT_DIR
    python benchmarks/peers/check_streaming_mask.py ours TASKS.jsonl OUT_DIR
    python benchmarks/peers/check_streaming_mask.py compare TASKS.jsonl OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

RATIO = 0.8


def _inputs(tok, task_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from spectralcache.eval.tasks import read_task_file

    s = read_task_file(task_file)[0]
    ctx = tok(s["context"], return_tensors="pt", add_special_tokens=True).input_ids
    q = tok(s["question"] + s["answer_prefix"], return_tensors="pt", add_special_tokens=False).input_ids
    return ctx, q


@torch.inference_mode()
def kvpress_half(task_file: Path, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import run_kvpress as rk
    from transformers import DynamicCache

    from spectralcache.eval.model import load_model

    torch.set_num_threads(1)
    model, tok = load_model()
    ctx, q = _inputs(tok, task_file)
    n = ctx.shape[1]
    res = {}
    for fix in (True, False):
        cache = DynamicCache(config=model.config)
        with rk.adapted_press(rk.make_press("streaming_llm", RATIO), model):
            model.model(input_ids=ctx, past_key_values=cache)
        if fix:
            rk.apply_mask_fix(cache, model, n)
        pos = torch.arange(n, n + q.shape[1]).unsqueeze(0)
        res["fix" if fix else "nofix"] = model(input_ids=q, past_key_values=cache, position_ids=pos).logits[0]
    torch.save(res, out / "kvpress_logits.pt")


@torch.inference_mode()
def ours_half(task_file: Path, out: Path) -> None:
    from spectralcache.eval.baselines import make_sink_window_cache
    from spectralcache.eval.model import load_model

    torch.set_num_threads(1)
    model, tok = load_model()
    ctx, q = _inputs(tok, task_file)
    n = ctx.shape[1]
    n_pruned = n - int(n * (1 - RATIO))  # StreamingLLMPress.score
    window = n - 4 - n_pruned
    cache = make_sink_window_cache(model, n_sink=4, window=window)
    model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
    torch.save(
        {"ours": model(input_ids=q, past_key_values=cache).logits[0], "window": window},
        out / "ours_logits.pt",
    )


def compare(out: Path) -> None:
    a = torch.load(out / "kvpress_logits.pt")
    b = torch.load(out / "ours_logits.pt")
    ref = b["ours"]
    rep = {
        "ratio": RATIO,
        "window": b["window"],
        "question_tokens": int(ref.shape[0]),
        "max_abs_logit_diff_kvpress_maskfix_vs_ours": float((a["fix"] - ref).abs().max()),
        "max_abs_logit_diff_kvpress_stock_mask_vs_ours": float((a["nofix"] - ref).abs().max()),
        "argmax_agree_maskfix": float((a["fix"].argmax(-1) == ref.argmax(-1)).float().mean()),
        "argmax_agree_stock_mask": float((a["nofix"].argmax(-1) == ref.argmax(-1)).float().mean()),
        "max_abs_logit_diff_first_question_token_stock_mask": float((a["nofix"][0] - ref[0]).abs().max()),
    }
    print(json.dumps(rep, indent=2))
    (out / "streaming_mask_check.json").write_text(json.dumps(rep, indent=2) + "\n")


if __name__ == "__main__":
    what, task_file, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    {"kvpress": lambda: kvpress_half(task_file, out), "ours": lambda: ours_half(task_file, out)}.get(
        what, lambda: compare(out)
    )()
