"""What quantisation (--hqq, or --int8 in the server args) costs in quality: greedy top-1 agreement of the
quantised model with the unquantised one. The unquantised model writes a greedy answer to each fixed prompt;
both models then read prompt + answer, and at every answer position we count whether their next-token argmax
agrees (teacher forcing, so one early disagreement does not decide all later ones).

    python -m bench.quantisation_quality                 # HQQ: the embedded model, 4 bits, groups of 64
    python -m bench.quantisation_quality --server-args "--hqq-nbits 8"
    python -m bench.quantisation_quality --server-args "--int8 true"
"""

from __future__ import annotations

import argparse
import copy
import shlex

import torch

from bench.baseline import encode, load
from bench.prompts import PROMPTS
from config import parse_config
from converters.hqq import quantize_linears
from converters.int8 import quantize_int8


@torch.inference_mode()
def agreement(reference: torch.nn.Module, quantised: torch.nn.Module, sequence: torch.Tensor, answer_from: int
              ) -> tuple[int, int]:
    """(agreeing positions, positions) over the answer tokens of one [1, tokens] sequence."""
    positions = slice(answer_from - 1, sequence.shape[1] - 1)
    expected = reference(sequence).logits[0, positions].argmax(-1)
    predicted = quantised(sequence).logits[0, positions].argmax(-1)
    return int((expected == predicted).sum()), expected.numel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Greedy top-1 agreement of the quantised model with the float one.")
    parser.add_argument("--server-args", default="",
                        help="main.py flags: model, dtype, --int8, or --hqq-nbits and --hqq-group-size")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    config = parse_config(shlex.split(args.server_args))
    reference, tokenizer = load(config)
    quantised = copy.deepcopy(reference)
    if config.int8:
        method = "int8 (W8A8)"
        print(quantize_int8(quantised).describe())
    else:
        method = f"HQQ {config.hqq_nbits} bits, groups of {config.hqq_group_size}"
        print(quantize_linears(quantised, config.hqq_nbits, config.hqq_group_size).describe())
    agreed = total = 0
    for prompt in PROMPTS:
        inputs = encode(tokenizer, [prompt], config.device)
        with torch.inference_mode():
            sequence = reference.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)
        hits, count = agreement(reference, quantised, sequence, inputs["input_ids"].shape[1])
        agreed, total = agreed + hits, total + count
    print(f"{config.hf_model or 'embedded model'} as {config.dtype}, {method}: greedy top-1 agreement "
          f"{agreed}/{total} = {100 * agreed / total:.1f}% over {len(PROMPTS)} prompts x {args.max_new_tokens} tokens")


if __name__ == "__main__":
    main()
