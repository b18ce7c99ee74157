"""Check that vLLM serves a composed model's stock ``flex_olmo`` export through its Transformers backend.

Not part of CI (vLLM needs a GPU and is not a flexmoe dependency). Usage, on a machine with vllm:

    python scripts/check_vllm.py MODEL_DIR [--tokens 16]

Loads MODEL_DIR with ``vllm.LLM(model_impl="transformers")``, decodes a few prompts greedily, and
compares the tokens with stock transformers' ``generate`` on the same directory. Exits 0 when every
prompt agrees (bf16 on GPU may differ after a near-tie: the first differing position is printed).
"""

from __future__ import annotations

import argparse
import sys

PROMPTS = ["def fibonacci(n):", "The parties agree that", "12 * 7 =", "Once upon a time"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    try:
        from vllm import LLM, SamplingParams  # optional: only this script needs vllm
    except ImportError:
        print("vllm is not installed: pip install vllm (on a GPU machine)", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    llm = LLM(model=args.model, model_impl="transformers", dtype=args.dtype, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    ok = True
    for prompt, ids in zip(PROMPTS, got, strict=True):
        enc = tok(prompt, return_tensors="pt")
        want = hf.generate(**enc, max_new_tokens=args.tokens, do_sample=False, eos_token_id=None)[0]
        want = want[enc["input_ids"].shape[1] :].tolist()
        same = list(ids) == want
        ok &= same
        first = next((i for i, (a, b) in enumerate(zip(ids, want, strict=False)) if a != b), None)
        print(
            f"{'OK  ' if same else 'DIFF'} {prompt!r}: vllm {tok.decode(ids)!r}"
            + ("" if same else f" / transformers {tok.decode(want)!r} (first difference at {first})")
        )
    print("vLLM (Transformers backend) matches stock transformers" if ok else "vLLM differs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
