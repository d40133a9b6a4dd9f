"""The engine's request handling: sampling, stop strings, limits, cancel, threads, hot swaps."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_support import (
    byte_llama,
    byte_tokenizer,
    greedy_reference,
    merged_by_hand,
    save_adapter,
)
from lorakit.errors import (
    AdapterInUseError,
    QueueFullError,
    RequestTooLargeError,
    ServeError,
    UnknownAdapterError,
)
from lorakit.serve import Engine, SamplingParams
from lorakit.serve.sampling import choose_tokens

PROMPT = [104, 101, 108, 108, 111]  # "hello"
WAIT_S = 60  # generous bound for a thread to finish a few tiny-model steps on a busy machine


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": save_adapter(
            byte_llama, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        ),
        "b": save_adapter(
            byte_llama, root / "b", 2, r=8, lora_alpha=8, target_modules="all-linear"
        ),
    }


def _engine(folders: dict[str, Path] | None = None, **options: object) -> Engine:
    engine = Engine.from_pretrained(byte_llama(), byte_tokenizer(), **options)  # type: ignore[arg-type]
    for name, folder in (folders or {}).items():
        engine.load_adapter(name, folder)
    return engine


def test_seeded_sampling_draws_from_the_filtered_distribution_of_the_model() -> None:
    engine = _engine()
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=5, max_tokens=8)
    tokens = engine.generate(["hello"], sampling=params)[0].token_ids
    again = engine.generate(["hello"], sampling=params)[0].token_ids
    other = engine.generate(
        ["hello"],
        sampling=SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=6, max_tokens=8),
    )[0].token_ids
    assert tokens == again
    assert tokens != other
    # By hand: logits / T, keep the 20 best, then the smallest set reaching 0.9, draw.
    model, generator, drawn = byte_llama(), torch.Generator().manual_seed(5), []
    for _ in range(8):
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + drawn])).logits[0, -1].double() / 0.7
        kth = logits.sort(descending=True).values[19]
        probs = torch.softmax(logits.masked_fill(logits < kth, -torch.inf), dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < 0.9
        filtered = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
        drawn.append(int(torch.multinomial(filtered.float(), 1, generator=generator)))
    assert tokens == drawn


def test_top_k_one_samples_the_greedy_tokens_and_logprobs_are_the_models() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9], [3.0, 0.0, 0.1, 0.2]])
    greedy = SamplingParams(logprobs=True)
    sampled = SamplingParams(temperature=1.5, top_k=1, seed=0, logprobs=True)
    tokens, logprobs = choose_tokens(logits, [greedy, sampled], [None, torch.Generator()])
    assert tokens == [1, 0]
    expected = torch.log_softmax(logits.double(), dim=-1)
    assert logprobs == pytest.approx([float(expected[0, 1]), float(expected[1, 0])], abs=1e-6)


def test_stop_string_across_tokens_cuts_the_text_and_the_stream_adds_up() -> None:
    engine = _engine()
    full = engine.generate(["hello world"], sampling=SamplingParams(max_tokens=20))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = "ũY"  # three byte tokens (197, 169, 89) in this model's greedy answer
    assert stop in full.text
    prompt = engine.tokenizer("hello world")["input_ids"]
    handle = engine.submit(prompt, None, SamplingParams(max_tokens=20, stop=(stop, "zzz")))
    engine._run_inline([handle])
    events = list(handle)
    assert "".join(e.text for e in events) == full.text[: full.text.index(stop)]
    assert events[-1].finish_reason == "stop"
    tokens = [e.token_id for e in events]
    assert tokens == full.token_ids[: len(tokens)] and tokens[-3:] == [197, 169, 89]
    assert (handle.prompt_tokens, handle.completion_tokens) == (len(prompt), len(tokens))


def test_end_of_sequence_token_stops_and_max_tokens_gives_length() -> None:
    model = byte_llama()
    first = greedy_reference(model, PROMPT, 3)
    model.generation_config.eos_token_id = first[1]  # the second greedy token ends it
    engine = Engine.from_pretrained(model, byte_tokenizer())
    handle = engine.submit(PROMPT, sampling=SamplingParams(max_tokens=10))
    engine._run_inline([handle])
    events = list(handle)
    assert [e.token_id for e in events] == first[:2]
    assert [e.finish_reason for e in events] == [None, "stop"]
    short = engine.submit(PROMPT, sampling=SamplingParams(max_tokens=1))
    engine._run_inline([short])
    assert [(e.token_id, e.finish_reason) for e in short] == [(first[0], "length")]


def test_request_errors_name_the_limit_and_the_loaded_adapters(folders: dict[str, Path]) -> None:
    engine = _engine(folders, max_queue=2, max_prompt_tokens=8, max_new_tokens=5)
    short = SamplingParams(max_tokens=2)
    with pytest.raises(
        RequestTooLargeError, match="prompt's length is 9, over the engine's limit of 8"
    ):
        engine.submit(list(range(9)), sampling=short)
    with pytest.raises(RequestTooLargeError, match="max_tokens is 6, over the engine's limit of 5"):
        engine.submit(PROMPT, sampling=SamplingParams(max_tokens=6))
    with pytest.raises(
        UnknownAdapterError,
        match=r"'aa' is not loaded. Loaded adapters: \['a', 'b'\]; did you mean 'a'",
    ):
        engine.submit(PROMPT, "aa", sampling=short)
    with pytest.raises(UnknownAdapterError, match="'c' is not loaded"):
        engine.submit(PROMPT, {"a": 1.0, "c": 0.5}, sampling=short)
    with pytest.raises(ValueError, match="weights must be finite numbers"):
        engine.submit(PROMPT, {"a": float("nan")}, sampling=short)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([300], sampling=short)
    with pytest.raises(ValueError, match="The prompt is empty"):
        engine.submit([], sampling=short)
    engine.submit(PROMPT, sampling=short)
    engine.submit(PROMPT, "a", sampling=short)
    with pytest.raises(QueueFullError, match="queue holds 2 waiting requests"):
        engine.submit(PROMPT, "b", sampling=short)
    assert engine.stats()["queue_depth"] == 2
    with pytest.raises(ValueError, match="Stop strings need a tokenizer"):
        Engine.from_pretrained(byte_llama()).submit(PROMPT, sampling=SamplingParams(stop=("x",)))


def test_adapters_the_engine_cannot_serve_are_refused_before_any_change(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    engine = _engine(folders)
    dora = save_adapter(
        byte_llama, tmp_path / "dora", 3, r=4, target_modules=["q_proj"], use_dora=True
    )
    with pytest.raises(ServeError, match="use_dora=True, which the serving engine does not serve"):
        engine.load_adapter("dora", dora)
    embedding = save_adapter(
        byte_llama, tmp_path / "emb", 3, r=4, target_modules=["embed_tokens", "q_proj"]
    )
    with pytest.raises(ServeError, match="LoRA on embeddings and DoRA are not served"):
        engine.load_adapter("emb", embedding)
    with pytest.raises(ServeError, match="is loaded already"):
        engine.load_adapter("a", folders["b"])
    with pytest.raises(ServeError, match="name 'base' is not allowed"):
        engine.load_adapter("base", folders["a"])
    edits = [
        ({"task_type": "SEQ_CLS"}, "task_type='SEQ_CLS', but this engine's base is a causal_lm"),
        ({"target_parameters": ["mlp.experts"]}, r"target_parameters=\['mlp.experts'\]"),
        ({"alora_invocation_tokens": [5, 6]}, r"alora_invocation_tokens=\[5, 6\]"),
    ]
    for index, (edit, message) in enumerate(edits):
        config = json.loads((folders["a"] / "adapter_config.json").read_text())
        edited = tmp_path / f"edited{index}"
        edited.mkdir()
        (edited / "adapter_config.json").write_text(json.dumps({**config, **edit}))
        shutil.copy(folders["a"] / "adapter_model.safetensors", edited)
        with pytest.raises(ServeError, match=message):
            engine.load_adapter(f"edited{index}", edited)
    assert sorted(engine.adapters()) == ["a", "b"]
    bank = engine.model.model.layers[0].self_attn.q_proj
    assert [name for name, _, _ in bank.layout] == ["a", "b"]


def _live_tensor_bytes() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    storages: dict[int, int] = {}
    for tensor in tensors:
        try:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # fake tensors a torch.compile test left in this worker hold no data
            continue
    return sum(storages.values())


def test_a_loaded_adapter_costs_exactly_its_tensors_and_unloading_frees_them(
    folders: dict[str, Path],
) -> None:
    engine = _engine({"a": folders["a"]})
    tensors = load_file(folders["b"] / "adapter_model.safetensors")
    file_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    before = _live_tensor_bytes()
    engine.load_adapter("b", folders["b"])
    assert _live_tensor_bytes() - before == file_bytes == engine.adapter_bytes("b")
    engine.unload_adapter("b")
    assert _live_tensor_bytes() == before


def test_cancel_frees_the_row_at_the_next_step_and_ends_the_stream(
    folders: dict[str, Path],
) -> None:
    engine = _engine(folders)
    cancelled = engine.submit(PROMPT, "a", SamplingParams(max_tokens=60))
    other = engine.submit(PROMPT[:3], "b", SamplingParams(max_tokens=30))
    engine._run_steps(2)
    assert engine._scheduler.batch.rows == 2
    cancelled.cancel()
    engine._run_steps(1)
    assert engine._scheduler.batch.rows == 1 and engine.stats()["running"] == 1
    # The cancelled row had the longer prompt: the padding columns left of `other` are cut.
    batch = engine._scheduler.batch
    assert bool(batch.mask.all()) and batch.length == len(PROMPT[:3]) + 3  # 3 tokens fed
    events = list(cancelled)
    assert [e.finish_reason for e in events] == [None] * 3 + ["cancelled"]
    assert events[-1].token_id == -1 and cancelled.completion_tokens == 3
    engine._run_inline([other])
    reference = merged_by_hand(byte_llama(), {folders["b"]: 1.0})
    assert [e.token_id for e in other] == greedy_reference(reference, PROMPT[:3], 30)
    assert engine._scheduler.batch.rows == 0 and engine._scheduler.batch.cache is None


def test_a_failing_forward_ends_its_requests_with_error_and_the_engine_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = _engine()
    failing = engine.submit(PROMPT, sampling=SamplingParams(max_tokens=4))
    scheduler = engine._scheduler

    def broken(*args: object) -> None:
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(scheduler, "_forward", broken)
    engine._run_inline([failing])
    assert [(e.token_id, e.finish_reason) for e in failing] == [(-1, "error")]
    monkeypatch.undo()
    assert scheduler.batch.rows == 0 and engine.stats()["running"] == 0
    working = engine.submit(PROMPT, sampling=SamplingParams(max_tokens=4))
    engine._run_inline([working])
    assert [e.token_id for e in working] == greedy_reference(byte_llama(), PROMPT, 4)


def test_hot_load_and_unload_while_requests_run(folders: dict[str, Path]) -> None:
    engine = _engine({"a": folders["a"]})
    sampling = SamplingParams(max_tokens=40)
    on_a = [engine.submit(PROMPT[: 2 + i], "a", sampling) for i in range(3)]
    in_use = r"'a' is used by 3 running or waiting request\(s\) and"
    with pytest.raises(AdapterInUseError, match=in_use + " wait=False"):
        engine.unload_adapter("a", wait=False)
    with pytest.raises(AdapterInUseError, match=in_use + " the engine is not started"):
        engine.unload_adapter("a")
    engine.start()
    try:
        # Holding the model lock, the scheduler cannot step meanwhile.
        with engine._model_lock, pytest.raises(AdapterInUseError, match="still used by 3"):
            engine.unload_adapter("a", timeout=0.05)
        stream = iter(on_a[0])
        first = next(stream)  # the batch is running
        engine.load_adapter("b", folders["b"])
        on_b = engine.submit(PROMPT, "b", SamplingParams(max_tokens=20))
        unloaded = threading.Event()
        waiter = threading.Thread(target=lambda: (engine.unload_adapter("a"), unloaded.set()))
        waiter.start()
        results = [[first.token_id] + [e.token_id for e in stream]]
        results += [[e.token_id for e in handle] for handle in on_a[1:]]
        waiter.join(WAIT_S)
        assert unloaded.is_set()
        assert "a" not in engine.adapters()
        with pytest.raises(UnknownAdapterError, match="'a' is not loaded"):
            engine.submit(PROMPT, "a")
        reference_a = merged_by_hand(byte_llama(), {folders["a"]: 1.0})
        for i, tokens in enumerate(results):
            assert tokens == greedy_reference(reference_a, PROMPT[: 2 + i], 40)
        reference_b = merged_by_hand(byte_llama(), {folders["b"]: 1.0})
        assert [e.token_id for e in on_b] == greedy_reference(reference_b, PROMPT, 20)
        bank = engine.model.model.layers[0].self_attn.q_proj
        assert [name for name, _, _ in bank.layout] == ["b"] and bank.used_rank == 8
        assert engine.stats()["per_adapter_requests"] == {"a": 3, "b": 1}
    finally:
        engine.shutdown()


def test_async_iteration_and_generate_with_the_thread_running(folders: dict[str, Path]) -> None:
    engine = _engine(folders)
    engine.start()
    try:

        async def collect() -> list[list[int]]:
            handles = [engine.submit(PROMPT, spec) for spec in ("a", None, {"a": 0.5, "b": 0.5})]
            streams = []
            for handle in handles:
                streams.append([event.token_id async for event in handle])
            return streams

        streamed = asyncio.run(collect())
        texts = engine.generate(["hello"] * 3, ["a", None, {"a": 0.5, "b": 0.5}])
    finally:
        engine.shutdown()
    assert streamed == [c.token_ids for c in texts]
    blend = merged_by_hand(byte_llama(), {folders["a"]: 0.5, folders["b"]: 0.5})
    assert streamed[2] == greedy_reference(blend, PROMPT, 16)
    assert streamed[1] == greedy_reference(byte_llama(), PROMPT, 16)


def test_shutdown_drains_or_cancels_and_refuses_new_requests(folders: dict[str, Path]) -> None:
    engine = _engine(folders)
    drained = engine.submit(PROMPT, "a", SamplingParams(max_tokens=12))
    engine.start()
    engine.shutdown(drain=True)
    assert [e.finish_reason for e in drained][-1] == "length"
    assert drained.completion_tokens == 12
    with pytest.raises(ServeError, match="shutting down"):
        engine.submit(PROMPT)
    engine = _engine(folders)
    cancelled = engine.submit(PROMPT, "a", SamplingParams(max_tokens=12))
    engine.shutdown(drain=False)
    assert [(e.token_id, e.finish_reason) for e in cancelled] == [(-1, "cancelled")]


def test_chat_prompt_uses_the_tokenizer_template() -> None:
    engine = _engine()
    messages = [{"role": "user", "content": "hi"}]
    assert engine.chat_prompt(messages) == list(b"<user>hi\n<assistant>")
    engine.tokenizer.chat_template = None
    with pytest.raises(ServeError, match="no chat template"):
        engine.chat_prompt(messages)


def test_a_layer_replication_adapter_is_refused(tmp_path: Path) -> None:
    engine = _engine()
    # layers swapped: the file's keys name base layers, yet layer 0's adapter belongs to layer 1
    swapped = save_adapter(
        byte_llama,
        tmp_path / "swap",
        3,
        r=4,
        target_modules=["q_proj"],
        layer_replication=[[1, 2], [0, 1]],
    )
    with pytest.raises(ServeError, match=r"layer_replication=\[\[1, 2\], \[0, 1\]\], which the"):
        engine.load_adapter("swap", swapped)
    assert sorted(engine.adapters()) == []


def test_the_engine_example_in_docs_serving_runs(
    folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```python title=engine.py\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1
    byte_llama().save_pretrained(tmp_path / "my-model")
    byte_tokenizer().save_pretrained(tmp_path / "my-model")
    for name, source in (("sql", "a"), ("polite", "b")):
        shutil.copytree(folders[source], tmp_path / "adapters" / name)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/serving.md", "exec"), {"__name__": "docs"})
    lines = capsys.readouterr().out.splitlines()
    prompt = list(b"the cat sat")
    sql = merged_by_hand(byte_llama(), {folders["a"]: 1.0})
    assert lines[0] == f"length {greedy_reference(sql, prompt, 16)}"
    assert lines[2] == f"length {greedy_reference(byte_llama(), prompt, 16)}"
    assert "'per_adapter_requests': {'sql': 2, 'polite': 2, 'base': 1}" in lines[-1]


def test_the_engines_plain_linears_run_frozen_products_and_keep_their_keys() -> None:
    from lorakit.layers.frozen import FrozenLinear

    base = byte_llama()
    engine = Engine.from_pretrained(base, byte_tokenizer())
    linears = {name for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    converted = {name for name, m in engine.model.named_modules() if type(m) is FrozenLinear}
    assert converted == linears and "lm_head" in converted
    assert engine.model.state_dict().keys() == base.state_dict().keys()
    assert all(type(m) is not FrozenLinear for m in base.modules())  # the caller's model: as it was
