"""Static KV eviction after prefill (MPCache's static stage, SnapKV): the window scores equal a
direct computation, the cut keeps what it must, compaction moves exactly the kept rows, and an
evicting engine equals a reference that masks the evicted tokens, through chunked prefill,
batching, swap and recompute preemption, freeing the blocks it empties."""

from __future__ import annotations

import random

import pytest
import torch

from tierserve import LLM, SamplingParams
from tierserve.config import SelectionConfig
from tierserve.selection import eviction
from tierserve.selection.eviction import MPCacheStatic, SnapKV, WindowObserver, compact


def _brute_scores(q, keys, q_slots, scale, reduce):
    """Attention of each window query over the keys it sees, float64, head by head."""
    nkv, ctx, _ = keys.shape
    group = q.shape[1] // nkv
    probs = torch.zeros(q.shape[1], q.shape[0], ctx, dtype=torch.float64)
    for head in range(q.shape[1]):
        for row in range(q.shape[0]):
            seen = int(q_slots[row]) + 1
            logits = keys[head // group, :seen].double() @ q[row, head].double() * scale
            probs[head, row, :seen] = logits.softmax(0)
    if reduce == "max":
        return probs.mean(0).amax(0)[None]
    return probs.view(nkv, group, q.shape[0], ctx).sum((1, 2))


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_window_scores_equal_a_direct_computation(reduce, monkeypatch):
    monkeypatch.setattr(eviction, "SCORE_ROWS", 3)  # several row blocks
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(7, 4, 8, generator=gen)
    keys = torch.randn(2, 40, 8, generator=gen)
    slots = torch.arange(33, 40)
    observer = WindowObserver(num_layers=2, num_kv_heads=2, length=40, reduce=reduce)
    observer.add(1, q[:4], keys[:, :37], slots[:4], 0.35)  # two chunks of one window
    observer.add(1, q[4:], keys, slots[4:], 0.35)
    expected = _brute_scores(q, keys, slots, 0.35, reduce)
    if reduce == "max":
        first = _brute_scores(q[:4], keys[:, :37], slots[:4], 0.35, reduce)
        expected[..., :37] = torch.maximum(first, expected[..., :37])
    torch.testing.assert_close(observer.scores[1].double(), expected, atol=1e-6, rtol=1e-5)
    assert observer.scores[0].abs().sum() == 0


def test_the_cut_keeps_the_forced_tokens_and_the_best_scored():
    config = SelectionConfig(kv_eviction="mpcache", kv_eviction_budget=0.25)
    policy = MPCacheStatic(config, block_size=4)
    observer = policy.observer(2, 2, 64)
    gen = torch.Generator().manual_seed(2)
    observer.scores.copy_(torch.rand(observer.scores.shape, generator=gen))
    kept = policy.keep(observer, 64)
    assert kept.shape == (2, 1, 16)
    for layer in range(2):
        row = kept[layer, 0].tolist()
        assert row == sorted(row) and len(set(row)) == 16
        assert {0, 1, 2, 3, 60, 61, 62, 63} <= set(row)  # the sink block and the last block
        free = [t for t in row if 4 <= t < 60]
        others = observer.scores[layer, 0, 4:60]
        assert observer.scores[layer, 0, free].min() >= others.topk(len(free)).values.min()
    threshold = SelectionConfig(kv_eviction="mpcache", kv_eviction_threshold=0.9)
    cut = MPCacheStatic(threshold, block_size=4).keep(observer, 64)
    survivors = [(observer.scores[layer, 0] >= 0.9).nonzero().flatten().tolist()
                 for layer in range(2)]
    for layer in range(2):
        assert set(survivors[layer]) <= set(cut[layer, 0].tolist())
    assert cut.shape[-1] == max(len(set(s) | {0, 1, 2, 3, 60, 61, 62, 63}) for s in survivors)


def test_snapkv_keeps_its_window_and_pools_per_kv_head():
    config = SelectionConfig(kv_eviction="snapkv", kv_eviction_budget=12, snapkv_window=4,
                             snapkv_pool=3)
    policy = SnapKV(config, block_size=4)
    observer = policy.observer(1, 2, 40)
    observer.scores[0, 0, 10] = 5.0  # one hot token per kv head; pooling keeps its neighbours
    observer.scores[0, 1, 20] = 5.0
    kept = policy.keep(observer, 40)
    assert kept.shape == (1, 2, 12)
    assert {9, 10, 11, 36, 37, 38, 39} <= set(kept[0, 0].tolist())
    assert {19, 20, 21, 36, 37, 38, 39} <= set(kept[0, 1].tolist())


@pytest.mark.parametrize("shared", [True, False])
def test_compaction_moves_exactly_the_kept_rows_and_recomputes_the_bounds(shared):
    gen = torch.Generator().manual_seed(3)
    block_size, layers, nkv, hd = 4, 3, 2, 5
    cache = torch.randn(12, layers, 2, nkv, block_size + 1, hd, generator=gen)
    table = [7, 2, 9, 4, 11]  # 20 slots
    before = cache.clone()
    heads = 1 if shared else nkv
    kept = torch.stack([torch.randperm(19, generator=gen)[:9].sort().values
                        for _ in range(layers * heads)]).view(layers, heads, 9)
    assert compact(cache, table, kept, block_size, key_bounds=True) == 9
    blocks = torch.tensor(table)
    for layer in range(layers):
        for head in range(nkv):
            src = kept[layer, 0 if shared else head]
            for half in range(2):
                old = before[blocks[src // block_size], layer, half, head, src % block_size]
                slots = torch.arange(9)
                new = cache[blocks[slots // block_size], layer, half, head, slots % block_size]
                assert torch.equal(new, old)
            keys = cache[blocks[torch.arange(9) // block_size], layer, 0, head,
                         torch.arange(9) % block_size]
            for index in range(3):  # blocks 0..2 hold 4, 4 and 1 kept rows
                rows = keys[index * block_size:(index + 1) * block_size]
                assert torch.equal(cache[table[index], layer, 0, head, block_size],
                                   rows.amax(0))
                assert torch.equal(cache[table[index], layer, 1, head, block_size],
                                   rows.amin(0))
    untouched = [b for b in range(12) if b not in table[:3]]
    assert torch.equal(cache[untouched], before[untouched])


# -- through the engine, against a masked reference built on transformers' own modules -----

def _prompts(seed=0, lengths=(300, 170, 230)):
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in lengths]


def _spy_keep(monkeypatch):
    """Record every cut: prompt length -> (layers, 1 or nkv, r) kept slots."""
    seen: dict[int, torch.Tensor] = {}
    original = eviction.StaticEviction.keep

    def keep(self, observer, length):
        kept = original(self, observer, length)
        seen[length] = kept.clone()
        return kept

    monkeypatch.setattr(eviction.StaticEviction, "keep", keep)
    return seen


def _reference_greedy(hf, prompt, kept, steps):
    """Greedy tokens where every query after the prompt sees, of the prompt, only the kept
    tokens of its layer and kv head (prefill queries see everything): the whole sequence is
    recomputed each step with transformers' Llama modules and an explicit mask."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = hf.config
    heads, nkv = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    length = len(prompt)
    tokens = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([tokens])
        n = len(tokens)
        positions = torch.arange(n)[None]
        x = hf.model.embed_tokens(ids)
        cos, sin = hf.model.rotary_emb(x, positions)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for index, layer in enumerate(hf.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, n, heads, hd).transpose(1, 2)
            k = attn.k_proj(h).view(1, n, nkv, hd).transpose(1, 2)
            v = attn.v_proj(h).view(1, n, nkv, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            visible = causal[None].repeat(heads, 1, 1)  # (heads, n, n)
            layer_kept = kept[index]
            for head in range(heads):
                group = head // (heads // nkv)
                prompt_seen = torch.zeros(length, dtype=torch.bool)
                prompt_seen[layer_kept[0 if layer_kept.shape[0] == 1 else group]] = True
                visible[head, length:, :length] &= prompt_seen
            k = k.repeat_interleave(heads // nkv, 1)
            v = v.repeat_interleave(heads // nkv, 1)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible[None])
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = hf.lm_head(hf.model.norm(x))[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens[length:]


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()


def _evicting_llm(tiny_llama_dir, name, **options):
    extra = dict(snapkv_window=16) if name == "snapkv" else {}
    return LLM(str(tiny_llama_dir), max_num_batched_tokens=64, kv_eviction=name,
               kv_eviction_budget=0.3, **extra, **options)


@pytest.mark.parametrize("name", ["mpcache", "snapkv"])
def test_evicting_engine_equals_the_masked_reference(tiny_llama_dir, hf_tiny, monkeypatch, name):
    kept = _spy_keep(monkeypatch)
    llm = _evicting_llm(tiny_llama_dir, name, num_blocks=128)
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert sorted(kept) == sorted(len(p) for p in prompts)
    for prompt, tokens in zip(prompts, outputs):
        cut = kept[len(prompt)]
        assert cut.shape[-1] == -(-3 * len(prompt) // 10)
        with torch.no_grad():
            assert tokens == _reference_greedy(hf_tiny, prompt, cut, 8)
    full = LLM(str(tiny_llama_dir), max_num_batched_tokens=64, num_blocks=128)
    dense = [o.outputs[0].token_ids for o in full.generate(prompts, params, use_tqdm=False)]
    assert dense != outputs  # the eviction changed what the model reads
    llm.core.kv.check_invariants()
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
    assert len(llm.core.kv.prefix_cache) == 0  # nothing of an evicting request is published


def test_eviction_frees_blocks_right_after_the_prefill(tiny_llama_dir):
    llm = _evicting_llm(tiny_llama_dir, "mpcache", num_blocks=128)
    core = llm.core
    prompt = _prompts(lengths=(300,))[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    core.add_request(core.make_request("r", prompt, params))
    request = core.scheduler.requests["r"]
    held = []
    trim = core.kv.trim
    core.kv.trim = lambda r: (held.append(core.kv.num_blocks_of(r.request_id)), trim(r))
    while not request.kv_evicted:
        core.step()
    assert held == [19]  # the whole prompt was held until the step that ended its prefill
    assert request.num_evicted_tokens == 300 - 90
    assert core.kv.num_blocks_of("r") == 6  # 90 kept tokens
    while core.has_unfinished():
        core.step()
    assert core.kv.num_free_blocks == core.kv.num_blocks


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_evicting_requests_give_the_unpreempted_tokens(tiny_llama_dir, mode):
    prompts = _prompts(seed=4, lengths=(300, 280, 260, 240))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = _evicting_llm(tiny_llama_dir, "snapkv", num_blocks=200)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = _evicting_llm(tiny_llama_dir, "snapkv", num_blocks=26, preemption_mode=mode,
                          swap_space="16MiB", enable_prefix_caching=False)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    scheduler = tight.core.scheduler
    assert scheduler.num_preemptions > 0
    assert (scheduler.num_swap_preemptions > 0) == (mode == "swap")
    assert got == expected
    tight.core.kv.check_invariants()
    assert tight.core.kv.num_free_blocks == tight.core.kv.num_blocks


def test_a_budget_of_everything_evicts_nothing_and_equals_full(tiny_llama_dir):
    prompts = _prompts(seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    full = LLM(str(tiny_llama_dir), max_num_batched_tokens=64, num_blocks=128)
    kept_all = _evicting_llm(tiny_llama_dir, "snapkv", num_blocks=128)
    kept_all.core.config.selection.kv_eviction_budget = 1.0
    kept_all.core.executor.eviction.config.kv_eviction_budget = 1.0

    def run(llm):
        return [(o.outputs[0].token_ids, [next(iter(e.values())).logprob
                                          for e in o.outputs[0].logprobs])
                for o in llm.generate(prompts, params, use_tqdm=False)]

    assert run(kept_all) == run(full)
