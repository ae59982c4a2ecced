"""Multi-LoRA against peft: rows of different adapters (and rows of none) share one batched forward, and each row's
greedy tokens are PeftModel.generate's for its adapter (the base model's generate for rows without one), in the
packed forward, the static step, its compiled graphs and beside speculative drafts; bfloat16 within the quality
matrix's bound; the prefix cache never serves one adapter's K/V to another; adapters that cannot be served are
refused with the reason."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from batching.lora_adapters import AdapterError
from config import Config
from model_manager import LoadedModel, build_engine, load_model
from tests.helpers import quality
from tests.helpers.engine import WarmUpRecord, finish, greedy, run_with_engine
from tests.helpers.lora import TOKENS, peft_tokens, reference, save_adapter
from tests.helpers.quality import save_decoder

ADAPTERS = {  # different ranks, targets, scalings
    "q-and-v": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "everywhere": dict(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "mlp": dict(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                alpha_pattern={"down_proj": 12}),
}
NAMES = [*ADAPTERS, None]
NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str | None, Path]:
    """The base model's folder (None) and each adapter's, made with peft with random A and B."""
    root = tmp_path_factory.mktemp("lora")
    save_decoder(root / "base")
    folders = {None: root / "base"}
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        folders[name] = save_adapter(root / "base", root / name, seed, **settings)
    return folders


def lora_config(folders, adapters=tuple(ADAPTERS), **settings) -> Config:
    modules = ",".join(f"{name}={folders[name]}" for name in adapters)
    return Config(hf_model=str(folders[None]), torch_dtype=settings.pop("torch_dtype", "float32"),
                  continuous_batching_batch_size=8, lora_modules=modules or None, enable_lora=True,
                  max_loras=settings.pop("max_loras", 4), **settings)


def prompts(count: int, seed: int, lengths=(4, 30)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def serve(config: Config, requests: list[tuple[list[int], str | None]], warm: WarmUpRecord | None = None,
          tokens: int = TOKENS, load: dict[str, Path] | None = None):
    """Every request at once but the last, which joins when the first finishes (its prompt chunked beside decoding
    rows); `load`: adapters loaded once the engine runs. Returns each sequence with its tokens and log-probabilities,
    and the loaded model."""
    loaded = load_model(config)

    def build():
        engine = build_engine(loaded, config)
        if warm is not None:
            return warm.warmed(lambda: engine)()
        return engine

    async def body(engine):
        for name, folder in (load or {}).items():
            loaded.adapters.load(name, str(folder))
        params = greedy(tokens, ignore_eos=True, logprobs=0)
        add = [lambda prompt=prompt, name=name: engine.add(prompt, params, adapter=loaded.adapters.by_name.get(name))
               for prompt, name in requests]
        first = [add() for add in add[:-1]]
        collected = [quality.collect(engine, seq) for seq in first]
        await collected[0]
        last = add[-1]()
        collected.append(quality.collect(engine, last))
        return list(zip([*first, last], [await served for served in collected]))
    return run_with_engine(build, body), loaded


def mixed_requests(seed: int, count: int = 9) -> list[tuple[list[int], str | None]]:
    return [(prompt, NAMES[index % len(NAMES)]) for index, prompt in enumerate(prompts(count, seed))]


@pytest.mark.parametrize("path", ["packed", "static", "drafts"])
def test_each_row_gives_peft_tokens_for_its_adapter_whatever_shares_the_batch(folders, path):
    settings = {"packed": {}, "static": dict(static_cache=True, static_cache_decoder_max_length=64),
                "drafts": dict(speculative_config=NGRAM)}[path]
    requests = mixed_requests(seed=1)
    served, _ = serve(lora_config(folders, **settings), requests)
    expected = [peft_tokens(folders, name, prompt) for prompt, name in requests]
    assert [tokens.tokens for _, tokens in served] == expected
    base = [peft_tokens(folders, None, prompt) for prompt, name in requests if name]
    assert base != [tokens for tokens, (_, name) in zip(expected, requests) if name], "the adapters change answers"


def test_the_compiled_step_serves_adapters_loaded_after_warm_up_without_recompiling(folders):
    """The compiled graphs read the slots' weights as buffers: an adapter written into its slot after they were
    compiled is served, with peft's tokens, and nothing compiles again."""
    warm = WarmUpRecord()
    config = lora_config(folders, adapters=["q-and-v"], torch_compile=True, static_cache_decoder_max_length=64)
    requests = mixed_requests(seed=2, count=6)
    served, _ = serve(config, requests, warm, load={name: folders[name] for name in ADAPTERS if name != "q-and-v"})
    assert [tokens.tokens for _, tokens in served] == [peft_tokens(folders, name, prompt) for prompt, name in requests]
    warm.assert_complete_and_never_recompiled()


@pytest.mark.parametrize("static", [False, True])
def test_bfloat16_rows_stay_within_the_quality_bound_of_peft(folders, static):
    """Each served token against PeftModel's own bfloat16 forward teacher-forced on the served tokens (the quality
    matrix's check: near-ties may go either way within its bound), packed and in the static step."""
    requests = mixed_requests(seed=3)
    settings = dict(static_cache=True, static_cache_decoder_max_length=64) if static else {}
    served, _ = serve(lora_config(folders, torch_dtype="bfloat16", **settings), requests)
    for (prompt, name), (_, tokens) in zip(requests, served):
        ids = torch.tensor([prompt + tokens.tokens[:-1]])
        same, float32 = (quality.forward_logprobs(reference(folders, name, dtype), input_ids=ids)[len(prompt) - 1:]
                         for dtype in (torch.bfloat16, torch.float32))
        assert quality.divergence(tokens, same, quality.BOUNDS[torch.bfloat16], float32) is None, name


@pytest.mark.parametrize("quantisation", ["int8", "hqq"])
def test_adapters_add_to_quantised_layers_as_peft_adds_to_them(folders, quantisation):
    """With --int8 or --hqq the adapters wrap the quantised layers: each served token is the choice of PeftModel
    over the served model's own quantised layers (and head), teacher-forced on the served tokens, within the
    quantised bound (an activation a float32 ulp either side of an int8 rounding step moves a whole step)."""
    requests = mixed_requests(seed=7, count=5)
    served, loaded = serve(lora_config(folders, **{quantisation: True}), requests)
    for (prompt, name), (_, tokens) in zip(requests, served):
        ids = torch.tensor([prompt + tokens.tokens[:-1]])
        model = quantised_reference(folders, name, loaded)
        logprobs = quality.forward_logprobs(model, input_ids=ids)[len(prompt) - 1:]
        assert quality.divergence(tokens, logprobs, quality.QUANTISED, logprobs) is None, name


def quantised_reference(folders, name: str | None, loaded: LoadedModel):
    """peft's LoRA layers (their A and B in float) over the served model's quantised layers, and its head."""
    model = reference(folders, name)
    inner = model.get_base_model() if name else model
    for path, layer in loaded.adapters.layers.layers.items():
        target = inner.get_submodule(path)
        if hasattr(target, "base_layer"):  # one of the adapter's: peft's layer around the base
            target.base_layer = layer.base
        else:
            parent, _, child = path.rpartition(".")
            setattr(inner.get_submodule(parent), child, layer.base)
    inner.set_output_embeddings(loaded.model.get_output_embeddings())
    return model


def test_the_prefix_cache_keeps_each_adapters_kv_apart(folders):
    """One long prompt, served in turn by the base model, an adapter, the same adapter again and another: only the
    repeat reads cached K/V, and every answer is peft's."""
    prompt = prompts(1, seed=4, lengths=(40, 40))[0]
    order = [None, "q-and-v", "q-and-v", "everywhere"]
    loaded = load_model(lora_config(folders))

    async def body(engine):
        served = []
        for name in order:
            seq = engine.add(prompt, greedy(TOKENS, ignore_eos=True), adapter=loaded.adapters.by_name.get(name))
            served.append(await finish(engine, seq))
        return served
    served = run_with_engine(lambda: build_engine(loaded, lora_config(folders)), body)
    assert [seq.cached_tokens for seq in served] == [0, 0, 32, 0]
    assert [seq.output_ids for seq in served] == [peft_tokens(folders, name, prompt) for name in order]


def test_unloaded_adapters_keep_their_slot_until_their_requests_finish(folders):
    """Unloading frees the name at once; its slot goes to a new adapter only once no sequence uses it, and a server
    holding --max-loras adapters refuses another with the numbers."""
    config = lora_config(folders, adapters=["q-and-v", "mlp"], max_loras=2)
    loaded = load_model(config)
    adapters = loaded.adapters
    prompt = prompts(1, seed=5)[0]

    async def body(engine):
        with pytest.raises(AdapterError, match=r"at most 2 LoRA adapters \(--max-loras\) and 2 are loaded"):
            adapters.load("everywhere", str(folders["everywhere"]))
        seq = engine.add(prompt, greedy(TOKENS, ignore_eos=True), adapter=adapters.by_name["mlp"])
        adapters.unload("mlp")
        assert "mlp" not in adapters.by_name
        with pytest.raises(AdapterError, match=r"1 more once the requests of unloaded adapters finish"):
            adapters.load("everywhere", str(folders["everywhere"]))
        await finish(engine, seq)
        slot = adapters.load("everywhere", str(folders["everywhere"])).slot
        return seq, slot
    seq, slot = run_with_engine(lambda: build_engine(loaded, config), body)
    assert seq.output_ids == peft_tokens(folders, "mlp", prompt)
    assert slot == seq.adapter.slot


def bad_adapter(folders, tmp_path, kind: str) -> Path:
    base = folders[None]
    if kind == "rank":
        return save_adapter(base, tmp_path / kind, 0, r=32, target_modules=["q_proj"])
    if kind == "dora":
        return save_adapter(base, tmp_path / kind, 0, r=4, target_modules=["q_proj"], use_dora=True)
    if kind == "bias":
        return save_adapter(base, tmp_path / kind, 0, r=4, target_modules=["q_proj"], bias="lora_only")
    if kind == "other base":  # a model of other sizes with the same layer names
        other = tmp_path / "other"
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
        return save_adapter(other, tmp_path / kind, 0, r=4, target_modules=["q_proj"])
    if kind == "other layers":
        folder = save_adapter(base, tmp_path / kind, 0, r=4, target_modules=["q_proj"])
        settings = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**settings, "target_modules": ["c_attn"]}))
        weights = load_file(folder / "adapter_model.safetensors")
        save_file({key.replace("q_proj", "c_attn"): value for key, value in weights.items()},
                  folder / "adapter_model.safetensors")
        return folder
    return tmp_path / "nothing here"


@pytest.mark.parametrize("kind, reason", [
    ("rank", "has rank 32, more than this server's --max-lora-rank 16"),
    ("dora", r"uses DoRA \(use_dora\)"),
    ("bias", "uses bias='lora_only'"),
    ("other base", r"q_proj weights of shapes \[4, 32\] and \[32, 4\], but the model's .* maps 64 to 64"),
    ("other layers", "adapts modules this model has no linear layer for: model.layers.0.self_attn.c_attn"),
    ("missing", "adapter_config.json not found"),
])
def test_adapters_that_cannot_be_served_are_refused_with_the_reason(folders, tmp_path, kind, reason):
    adapters = load_model(lora_config(folders, adapters=[])).adapters
    with pytest.raises(AdapterError, match=reason):
        adapters.load("bad", str(bad_adapter(folders, tmp_path, kind)))
    assert not adapters.by_name


def test_an_adapter_may_not_take_the_base_models_name_or_a_loaded_ones(folders):
    adapters = load_model(lora_config(folders, adapters=["mlp"])).adapters
    for name in ("base", "mlp"):
        with pytest.raises(AdapterError) as refused:
            adapters.load(name, str(folders["q-and-v"]))
        assert refused.value.param == "lora_name"


def test_lora_flags_are_checked_at_start_up(folders):
    with pytest.raises(Exception, match="more than --max-loras 1"):
        lora_config(folders, max_loras=1).validate()
    with pytest.raises(Exception, match="expected NAME=PATH"):
        Config(lora_modules="just-a-path").validate()
    with pytest.raises(Exception, match="not for encoder-decoder"):
        Config(hf_model="t5-folder", architecture_type="encoder-decoder", enable_lora=True).validate()

