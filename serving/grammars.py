"""Grammars that constrain decoding, on llguidance: JSON schemas, regexes, choices and Lark grammars are
compiled once (cached by their text, off the event loop), and each sequence walks its own copy of the
compiled matcher while the sampler masks its row of the batch."""

from __future__ import annotations

import json
from functools import lru_cache

import llguidance.hf
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import gbnf_to_lark

from serving.errors import APIError

# Compact JSON in the spacing models see most (Python's json.dumps): free whitespace lets a small model pad
# its answer with blank lines until it runs out of tokens.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
COMPILED_GRAMMARS_KEPT = 256


class GrammarConstraint:
    """One sequence's position in a compiled grammar (batching's TokenConstraint)."""

    def __init__(self, matcher: LLMatcher) -> None:
        self.matcher = matcher

    def write_mask(self, address: int, size: int) -> None:
        self.matcher.unsafe_compute_mask_ptr(address, size)

    def accept(self, token_id: int) -> bool:
        return self.matcher.consume_token(token_id)

    @property
    def complete(self) -> bool:
        return self.matcher.is_stopped()


class CompiledGrammar:
    """A validated grammar (batching's Grammar): every sequence starts from a copy of one matcher."""

    def __init__(self, matcher: LLMatcher) -> None:
        self.matcher = matcher

    def constraint(self) -> GrammarConstraint:
        return GrammarConstraint(self.matcher.deep_copy())


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        """vocab_size: the width of the model's logits (it may exceed the tokenizer's)."""
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
        self.compile = lru_cache(maxsize=COMPILED_GRAMMARS_KEPT)(self._compile)

    def json_schema(self, schema: dict | bool, param: str) -> CompiledGrammar:
        return self.compile(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT), param)

    def regex(self, pattern: str, param: str) -> CompiledGrammar:
        return self.compile(LLMatcher.grammar_from_regex(pattern), param)

    def choice(self, options: list[str], param: str) -> CompiledGrammar:
        return self.lark("start: " + " | ".join(json.dumps(option) for option in options), param)

    def lark(self, grammar: str, param: str) -> CompiledGrammar:
        """A Lark grammar (llguidance's dialect, with %json{...} for embedded schemas); GBNF is converted."""
        if "::=" in grammar:
            try:
                grammar = gbnf_to_lark(grammar)
            except Exception as error:
                raise APIError(400, f"the grammar is not valid GBNF: {error}", param=param) from None
        return self.compile(LLMatcher.grammar_from_lark(grammar), param)

    def _compile(self, grammar: str, param: str) -> CompiledGrammar:
        try:
            failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            # a warning is a feature llguidance would not enforce: never fall back silently to a looser grammar
            matcher = None if failed or messages else LLMatcher(self.tokenizer, grammar)
        except Exception as error:  # llguidance raises for some malformed grammars instead of reporting them
            failed, messages, matcher = True, [str(error)], None
        if matcher is not None and matcher.is_error():
            messages = [matcher.get_error()]
        if matcher is None or matcher.is_error():
            raise APIError(400, f"this {param} cannot be enforced: {'; '.join(messages)}", param=param)
        return CompiledGrammar(matcher)
