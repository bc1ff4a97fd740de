"""`python -m mamba_core generate --model DIR --prompt "..." --backend numpy --max-new-tokens 50`

Loads a local HuggingFace or official Mamba checkpoint, prefills the prompt in one call,
then decodes token by token, streaming the text as it is produced, and prints the prefill
and decode rates (tokens/s) at the end.  With a `tokenizer.json` in the model directory
(and the `tokenizers` package) the prompt is text; otherwise it is token ids separated by
spaces and the output is token ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _tokenizer(directory: str):
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print(
            "note: tokenizer.json found but the 'tokenizers' package is missing "
            "(pip install tokenizers); using token ids",
            file=sys.stderr,
        )
        return None
    return Tokenizer.from_file(path)


def generate(args) -> int:
    from .lm import MambaLM

    lm = MambaLM.from_pretrained(args.model, backend=args.backend, dtype=args.dtype)
    tok = _tokenizer(args.model)
    if tok is not None:
        prompt = tok.encode(args.prompt).ids
    else:
        try:
            prompt = [int(t) for t in args.prompt.split()]
        except ValueError:
            print(
                f"error: {args.model!r} has no tokenizer.json: --prompt must be token ids "
                "separated by spaces",
                file=sys.stderr,
            )
            return 2
    if not prompt:
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    ids = np.asarray([prompt], dtype=np.int64)
    out = sys.stdout
    if tok is None:
        out.write(" ".join(map(str, prompt)))
    else:
        out.write(args.prompt)
    out.flush()
    start = time.perf_counter()
    stream = lm.generate(
        ids,
        args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=args.eos_token_id,
        stream=True,
    )
    new: list[int] = []
    shown = ""
    first_at = None
    for token in stream:
        if first_at is None:
            first_at = time.perf_counter()
        new.append(int(token[0]))
        if tok is None:
            out.write(f" {new[-1]}")
        else:
            text = tok.decode(prompt + new)[len(tok.decode(prompt)) :]
            out.write(text[len(shown) :])
            shown = text
        out.flush()
    end = time.perf_counter()
    out.write("\n")
    prefill_s = (first_at or end) - start
    decode_s = end - (first_at or end)
    decode_rate = (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else float("nan")
    print(
        f"[{args.backend}] prefill: {len(prompt)} tokens in {prefill_s:.3f} s "
        f"({len(prompt) / prefill_s:.1f} tokens/s); decode: {len(new)} tokens, "
        f"{decode_rate:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mamba_core", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a local checkpoint")
    g.add_argument("--model", required=True, help="checkpoint directory (HF or official layout)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--backend", default="auto", choices=["auto", "numpy", "jax", "torch"])
    g.add_argument("--dtype", default="float32")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--eos-token-id", type=int, default=None)
    args = parser.parse_args(argv)
    return generate(args)


if __name__ == "__main__":
    raise SystemExit(main())
