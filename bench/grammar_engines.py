"""llguidance against xgrammar on our vocabulary (the embedded SmolLM2's 49,152 tokens): set-up per
tokenizer, compile time per schema (cold, cache off) and mask time per decoding step, walking the tokens of
a valid reply. Single-threaded, as the engine's torch thread uses them.

    pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2   (make install-bench does this)
    python -m bench.grammar_engines
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers

from bench.run_all import RESULTS, cpu_model
from config import Config
from converters.gguf import cached_gguf_conversion
from model_manager import embedded_gguf_path

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "color": {"enum": ["red", "green", "blue"]}},
          "required": ["name", "age", "color"], "additionalProperties": False}
ORDER = {"type": "object", "$defs": {"item": {"type": "object", "properties": {
    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "qty": {"type": "integer"}},
    "required": ["sku", "qty"], "additionalProperties": False}},
    "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                   "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["items", "note"], "additionalProperties": False}
WIDE = {"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"]} for i in range(30)},
        "required": [f"field_{i}" for i in range(30)], "additionalProperties": False}
CASES = {
    "person": (PERSON, {"name": "Ada Lovelace", "age": 36, "color": "green"}),
    "order ($ref, pattern, anyOf)": (ORDER, {"items": [{"sku": "ABC-123", "qty": 2}, {"sku": "XYZ-999", "qty": 1}],
                                             "note": "leave at the door"}),
    "30 required fields": (WIDE, {f"field_{i}": [f"value {i}", i, i % 2 == 0][i % 3] for i in range(30)}),
}


def embedded_tokenizer():
    folder = cached_gguf_conversion(embedded_gguf_path(), Path(Config().model_cache_dir))
    return transformers.AutoTokenizer.from_pretrained(folder)


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, eos: int) -> None:
        import llguidance.hf
        self.llg = __import__("llguidance")
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=[eos])
        self.words = (vocab + 31) // 32

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        return self.llg.LLMatcher(self.tokenizer, grammar)

    def walk(self, matcher, tokens: list[int]) -> list[float]:
        mask = torch.empty(self.words, dtype=torch.int32)
        times = []
        for token in tokens:
            started = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), self.words * 4)
            times.append(time.perf_counter() - started)
            assert matcher.consume_token(token), matcher.get_error()
        return times


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, eos: int) -> None:
        import xgrammar
        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(", ", ": "), strict_mode=True)
        return self.xgr.GrammarMatcher(compiled)

    def walk(self, matcher, tokens: list[int]) -> list[float]:
        mask = self.xgr.allocate_token_bitmask(1, self.vocab)
        times = []
        for token in tokens:
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - started)
            assert matcher.accept_token(token)
        return times


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = embedded_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    rows = []
    for engine_class in (Llguidance, Xgrammar):
        engine, setup = timed(engine_class, tokenizer, vocab, eos)
        print(f"{engine.name}: tokenizer set-up {setup * 1000:.0f} ms", flush=True)
        for case, (schema, instance) in CASES.items():
            tokens = tokenizer(json.dumps(instance), add_special_tokens=False).input_ids
            compile_times, mask_times = [], []
            for _ in range(3):
                matcher, seconds = timed(engine.compile, schema)
                compile_times.append(seconds)
                mask_times += engine.walk(matcher, tokens)
            rows.append((engine.name, setup, case, len(tokens), statistics.median(compile_times),
                         statistics.mean(mask_times), max(mask_times)))
            print(rows[-1], flush=True)
    lines = [f"- {cpu_model()}, {os.cpu_count()} CPUs, one thread; vocabulary {vocab} tokens (SmolLM2)", "",
             "| engine | tokenizer set-up ms | schema | reply tokens | compile ms (cold) | mask us/step mean | "
             "mask us/step max |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {e} | {s * 1e3:.0f} | {c} | {n} | {comp * 1e3:.1f} | {mean * 1e6:.0f} | {most * 1e6:.0f} |"
              for e, s, c, n, comp, mean, most in rows]
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grammar_engines.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
