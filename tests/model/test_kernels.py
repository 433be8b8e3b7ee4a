"""Native CPU kernels against the torch ops they replace, and the model with them on and off."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension as cpp_extension

import tierserve.kernels as kernels
from tierserve.engine.llm import LLM
from tierserve.kernels import cpu_ops
from tierserve.model.hub import tierserve_home
from tierserve.model.layers import TorchPagedAttention, apply_rotary, rms_norm
from tierserve.request import SamplingParams

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="native kernels could not be built here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k", [576, 100])  # 100: not a multiple of the vector width
def test_skinny_linear_matches_f_linear(dtype, rows, k):
    gen = torch.Generator().manual_seed(rows * k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(300, k, generator=gen).to(dtype)
    bias = torch.randn(300, generator=gen).to(dtype)
    exact = F.linear(x.double(), w.double(), bias.double())
    got = ops.skinny_linear(x, w, bias)
    assert got.dtype == dtype and got.shape == (rows, 300)
    # float32: summation order only; bfloat16: one rounding of the float32 sum (2^-8 relative).
    tolerance = 1e-4 if dtype == torch.float32 else 2 ** -8 * exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= tolerance
    reference = F.linear(x, w, bias).double()
    assert (got.double() - reference).abs().max().item() <= 2 * tolerance


def test_skinny_linear_rejects_what_it_cannot_do():
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        ops.skinny_linear(torch.zeros(9, 4), torch.zeros(3, 4), None)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.skinny_linear(torch.zeros(1, 4), torch.zeros(3, 4, dtype=torch.bfloat16), None)


def _paged_case(batch: int, num_heads: int, num_kv_heads: int, dtype, seed: int = 0,
                head_dim: int = 64):
    gen = torch.Generator().manual_seed(seed)
    block_size, num_blocks, layers = 16, 320, 3
    cache = torch.randn(num_blocks, layers, 2, block_size, num_kv_heads, head_dim,
                        generator=gen).to(dtype)
    lens = torch.randint(1, 200, (batch,), generator=gen)
    width = int(-(-lens.max() // block_size))
    tables = torch.randperm(num_blocks, generator=gen)[: batch * width].view(batch, width)
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    return q, cache[:, 1, 0], cache[:, 1, 1], tables, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 20])  # 20: whole sequences per task, else per kv head
# Head sizes 64 and 128 take the register-resident path; 32 the generic loop.
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 64), (8, 2, 128), (8, 2, 32)])
def test_paged_decode_attention_matches_sdpa(dtype, batch, heads):
    num_heads, num_kv_heads, head_dim = heads
    q, k_cache, v_cache, tables, lens = _paged_case(batch, num_heads, num_kv_heads, dtype,
                                                    head_dim=head_dim)
    attention = TorchPagedAttention(num_heads, num_kv_heads, head_dim)
    width = tables.shape[1] * 16
    mask = (torch.arange(width)[None, :] < lens[:, None]).view(batch, 1, 1, width)
    reference = attention._decode(q.float(), k_cache.float(), v_cache.float(), tables, mask)
    got = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, attention.scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - reference).abs().max().item() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_row_does_not_depend_on_the_batch(dtype):
    q, k_cache, v_cache, tables, lens = _paged_case(20, 9, 3, dtype, seed=3)
    together = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    for row in (0, 7, 19):
        alone = ops.paged_decode_attention(q[row : row + 1], k_cache, v_cache,
                                           tables[row : row + 1], lens[row : row + 1], 0.125)
        assert torch.equal(alone[0], together[row])


def _shared_prefix_case(groups: list[int], prefix_blocks: int, num_heads: int,
                        num_kv_heads: int, head_dim: int = 64, seed: int = 0, singles: int = 0):
    """``groups``: sizes of groups whose tables start with the same ``prefix_blocks`` blocks
    (then blocks of their own, own lengths); plus ``singles`` sequences sharing nothing."""
    gen = torch.Generator().manual_seed(seed)
    block_size, num_blocks = 16, 600
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    rows, lens = [], []
    for size in groups + [1] * singles:
        prefix = [free.pop() for _ in range(prefix_blocks)]
        for _ in range(size):
            own = int(torch.randint(1, 60, (1,), generator=gen))
            blocks = prefix + [free.pop() for _ in range(-(-own // block_size))]
            rows.append(blocks)
            lens.append(prefix_blocks * block_size + own)
    width = max(map(len, rows))
    tables = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    order = torch.randperm(len(rows), generator=gen)  # members scattered through the batch
    q = torch.randn(len(rows), num_heads, head_dim, generator=gen)
    return (q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables[order],
            torch.tensor(lens)[order])


@pytest.mark.skipif("avx512_bf16" not in kernels.cpu_flags(),
                    reason="the fused shared-prefix path needs AVX-512 BF16 (else it is the "
                           "unfused kernel, as TIERSERVE_KERNELS=force builds it here)")
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128), (4, 4, 64)])
@pytest.mark.parametrize("groups, singles", [([64], 0), ([5, 17, 2], 3), ([16], 4)])
def test_shared_prefix_attention_matches_sdpa_within_the_kernels_tolerance(heads, groups,
                                                                         singles):
    num_heads, num_kv_heads, head_dim = heads
    q, k_cache, v_cache, tables, lens = _shared_prefix_case(groups, 8, num_heads, num_kv_heads,
                                                            head_dim, singles=singles)
    attention = TorchPagedAttention(num_heads, num_kv_heads, head_dim)
    width = tables.shape[1] * 16
    mask = (torch.arange(width)[None, :] < lens[:, None]).view(len(lens), 1, 1, width)
    reference = attention._decode(q.float(), k_cache.float(), v_cache.float(), tables, mask)
    got = ops.paged_decode_attention_shared(q, k_cache, v_cache, tables, lens, attention.scale,
                                            4)
    unfused = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, attention.scale)
    assert (got.float() - reference).abs().max().item() < 2e-2  # as the unfused kernel's
    assert (unfused.float() - reference).abs().max().item() < 2e-2
    assert not torch.equal(got, unfused)  # the groups did take the fused path


def test_shared_prefix_attention_leaves_a_group_of_one_and_short_prefixes_alone():
    """Sequences sharing nothing, a group too small to fill a 16-query tile (2 sequences x 3
    query heads a kv head), or fewer blocks than asked, get paged_decode_attention's result bit
    for bit, also beside a fused group."""
    q, k_cache, v_cache, tables, lens = _shared_prefix_case([6, 2], 8, 9, 3, singles=5, seed=4)
    fused = ops.paged_decode_attention_shared(q, k_cache, v_cache, tables, lens, 0.125, 4)
    unfused = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    first = tables[:, 0].tolist()
    alone = [i for i, block in enumerate(first) if first.count(block) <= 2]
    assert len(alone) == 7
    assert torch.equal(fused[alone], unfused[alone])
    assert not torch.equal(fused, unfused)  # the group of 6 was fused
    too_short = ops.paged_decode_attention_shared(q, k_cache, v_cache, tables, lens, 0.125, 9)
    assert torch.equal(too_short, unfused)
    as_float = ops.paged_decode_attention_shared(q.float(), k_cache.float(), v_cache.float(),
                                                 tables, lens, 0.125, 4)
    assert torch.equal(as_float, ops.paged_decode_attention(
        q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.125))  # float32: unfused


@pytest.mark.parametrize("system_blocks, templates", [
    (8, [(8, 6), (8, 6), (6, 5)]),  # a system prompt, then templates (each a run of its own)
    (1, [(8, 8), (7, 6)]),  # a system prompt too short alone: its block goes to each template
    (6, [(8, 6), (2, 6), (1, 4)]),  # templates with too few sequences: attended alone
])
def test_nested_prefixes_are_fused_at_each_depth_within_the_kernels_tolerance(system_blocks,
                                                                              templates):
    case = _tree_case((system_blocks, [(blocks, members) for members, blocks in templates]))
    nested = _check_against_sdpa(case)
    top_only = _check_against_sdpa(case, max_levels=1)
    q, k_cache, v_cache, tables, lens = case
    unfused = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 64 ** -0.5)
    assert not torch.equal(nested, unfused)
    if system_blocks >= 4:  # the templates' runs split what the top run alone reads whole
        assert not torch.equal(nested, top_only)


def _tree_case(tree, seed: int = 0, own=(1, 60)):
    """Block tables of a prefix tree: a node is (blocks, [children]) or (blocks, members); each
    member adds ``own`` tokens (a range, or 0: its length ends at its last shared block)."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(1200, 16, 3, 64, generator=gen)
    v_cache = torch.randn(1200, 16, 3, 64, generator=gen)
    free = torch.randperm(1200, generator=gen).tolist()
    rows, lens = [], []

    def grow(node, above):
        blocks, below = node
        path = above + [free.pop() for _ in range(blocks)]
        if isinstance(below, int):
            for _ in range(below):
                extra = own if isinstance(own, int) else int(torch.randint(*own, (1,), generator=gen))
                rows.append(path + [free.pop() for _ in range(-(-extra // 16))])
                lens.append(len(path) * 16 + extra)
        else:
            for child in below:
                grow(child, path)

    grow(tree, [])
    width = max(map(len, rows))
    tables = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    order = torch.randperm(len(rows), generator=gen)
    q = torch.randn(len(rows), 9, 64, generator=gen)
    return (q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables[order],
            torch.tensor(lens)[order])


def _check_against_sdpa(case, min_blocks: int = 4, **kwargs):
    q, k_cache, v_cache, tables, lens = case
    attention = TorchPagedAttention(9, 3, 64)
    width = tables.shape[1] * 16
    mask = (torch.arange(width)[None, :] < lens[:, None]).view(len(lens), 1, 1, width)
    reference = attention._decode(q.float(), k_cache.float(), v_cache.float(), tables, mask)
    got = ops.paged_decode_attention_shared(q, k_cache, v_cache, tables, lens, attention.scale,
                                            min_blocks, **kwargs)
    assert (got.float() - reference).abs().max().item() < 2e-2  # as the unfused kernel's
    return got


def test_three_levels_and_many_parts_and_members_without_own_tokens():
    """A three-level tree (system prompt > templates > documents), split into several key
    ranges per run (32 threads), members whose length ends exactly at their last shared block
    (that block goes to their own pass), all within the kernel's tolerance."""
    tree = (24, [(8, [(8, 8), (8, 7)]), (12, [(6, 8), (5, 7)])])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(32)  # 2 x 32 tasks wanted over 7 runs x 3 kv heads: 2-4 parts
        many_parts = _check_against_sdpa(_tree_case(tree, seed=3))
        no_own = _check_against_sdpa(_tree_case(tree, seed=3, own=0))
        top_only = _check_against_sdpa(_tree_case(tree, seed=3), max_levels=1)
        torch.set_num_threads(1)
        one_part = _check_against_sdpa(_tree_case(tree, seed=3))
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(many_parts, one_part)  # 32 threads did split the runs into parts
    assert not torch.equal(many_parts, top_only)  # the deeper levels were fused
    assert no_own.shape == many_parts.shape


def test_shared_prefix_attention_refuses_lengths_past_the_table():
    q, k_cache, v_cache, tables, lens = _tree_case((8, 8), seed=1)
    lens[0] = tables.shape[1] * 16 + 1
    with pytest.raises(RuntimeError, match="lens must lie"):
        ops.paged_decode_attention_shared(q, k_cache, v_cache, tables, lens, 0.125, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(1, 576), (7, 100), (64, 576)])  # 100: masked tail
def test_add_rms_norm_matches_residual_add_then_rms_norm(dtype, rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, width, generator=gen).to(dtype)
    residual = torch.randn(rows, width, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype)
    out, hidden = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(hidden, residual + x)  # the add rounds exactly as torch's does
    alone, same = ops.add_rms_norm(x, None, weight, 1e-5)
    assert same.data_ptr() == x.data_ptr()  # no residual: x is the residual stream, not copied
    for got, source in ((out, residual + x), (alone, x)):
        reference = rms_norm(source, weight, 1e-5)
        if dtype == torch.bfloat16:  # float32 sums in another order, then the same roundings
            assert torch.equal(got, reference)
        else:
            assert (got - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, heads, kv_heads, head_dim", [(1, 9, 3, 64), (33, 9, 3, 64),
                                                             (5, 4, 2, 40)])
def test_rotary_in_place_equals_apply_rotary(dtype, rows, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(rows * heads)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 4000, (rows,), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions[:, None].float() * inv_freq[None]
    cos = torch.cat([angles, angles], -1).cos().to(dtype)
    sin = torch.cat([angles, angles], -1).sin().to(dtype)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, v = (t.clone() for t in qkv.split(sizes, -1))
    ops.rotary_(qkv, cos, sin, heads + kv_heads, head_dim)
    got_q, got_k, got_v = qkv.split(sizes, -1)
    assert torch.equal(got_q.view(rows, heads, head_dim),
                       apply_rotary(q.view(rows, heads, head_dim), cos[:, None], sin[:, None]))
    assert torch.equal(got_k.view(rows, kv_heads, head_dim),
                       apply_rotary(k.view(rows, kv_heads, head_dim), cos[:, None], sin[:, None]))
    assert torch.equal(got_v, v)  # values are not rotated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(1, 1536), (9, 1000), (64, 1536)])
def test_silu_mul_matches_torch(dtype, rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    gate_up = (3 * torch.randn(rows, 2 * width, generator=gen)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    reference = F.silu(gate) * up
    got = ops.silu_mul(gate_up)
    # exp to ~2 float32 ulps instead of Sleef's 1: equal after bfloat16 rounding but for ties.
    mismatched = (got != reference).float().mean().item()
    assert mismatched <= (1e-3 if dtype == torch.bfloat16 else 0.2)
    relative = (got.float() - reference.float()).abs() / reference.float().abs().clamp_min(1e-30)
    assert relative.max().item() <= (2 ** -8 if dtype == torch.bfloat16 else 1e-6)


def test_fused_kernels_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="residual must match"):
        ops.add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="heads \\* head_dim > width"):
        ops.rotary_(torch.zeros(2, 64), torch.zeros(2, 64), torch.zeros(2, 64), 2, 64)
    with pytest.raises(RuntimeError, match="rows, 2 \\* n"):
        ops.silu_mul(torch.zeros(2, 7))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_gives_the_same_tokens_with_kernels_off(tiny_llama_dir, monkeypatch, dtype):
    prompts = [[1, 5, 9, 14, 3] * k for k in (1, 4, 13)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run():
        llm = LLM(str(tiny_llama_dir), num_blocks=64, dtype=dtype)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return llm, [o.outputs[0].token_ids for o in outputs]

    with_kernels, tokens = run()
    assert with_kernels.engine.runner.model.ops is not None
    monkeypatch.setenv("TIERSERVE_KERNELS", "0")
    without, reference = run()
    assert without.engine.runner.model.ops is None
    assert tokens == reference


def test_model_with_shared_prefix_attention_agrees_with_the_unfused_path(head64_llama_dir):
    """12 requests sharing a 320-token prefix decode together: the fused path runs, its
    logprobs differ from the unfused path's only by rounding, and so do the tokens."""
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 500, (320,), generator=gen).tolist()
    prompts = [prefix + torch.randint(3, 500, (8,), generator=gen).tolist() for _ in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)

    def run(shared: bool):
        llm = LLM(str(head64_llama_dir), num_blocks=256, dtype="bfloat16",
                  shared_prefix_attention=shared)
        attention = llm.engine.runner.model.attention
        calls = []

        class Counting:
            def __getattr__(self, name):
                if name == "paged_decode_attention_shared":
                    calls.append(name)
                return getattr(ops, name)

        attention.ops = Counting()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        logprobs = [[next(iter(step.values())).logprob for step in o.outputs[0].logprobs]
                    for o in outputs]
        llm.engine.runner.close()
        return [o.outputs[0].token_ids for o in outputs], logprobs, len(calls)

    fused_tokens, fused_logprobs, fused_calls = run(True)
    tokens, logprobs, calls = run(False)
    assert fused_calls > 0 and calls == 0
    # bfloat16 rounds differently along the two paths (as any two bfloat16 kernels do), so a
    # near tie may flip a token; compare up to each sequence's first difference.
    same = sum(a == b for a, b in zip(fused_tokens, tokens))
    assert same >= 10, (fused_tokens, tokens)
    diffs = []
    for a, b, la, lb in zip(fused_tokens, tokens, fused_logprobs, logprobs):
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        diffs += [abs(x - y) for x, y in zip(la[: agree + 1], lb[: agree + 1])]
    assert 0 < max(diffs) < 0.05


def test_the_build_cache_is_keyed_by_the_cpu(monkeypatch):
    here = kernels.build_key()
    assert kernels.build_key() == here  # stable on one machine: later runs reuse the build
    monkeypatch.setattr(kernels, "cpu_identity", lambda: "model name: another CPU\nflags: sse2")
    assert kernels.build_key() != here  # -march=native code from another CPU is not loaded


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty $TIERSERVE_HOME whose compiler is faked: a "build" copies this machine's real
    library (from the real cache: ``ops`` may have been loaded from a build's work folder since
    moved) into the work folder, and is recorded in ``compiles``."""
    built = tierserve_home() / "kernels" / kernels.build_key() / f"{kernels.MODULE_NAME}.so"
    assert built.is_file()
    monkeypatch.setenv("TIERSERVE_HOME", str(tmp_path))
    library = tmp_path / "kernels" / kernels.build_key() / f"{kernels.MODULE_NAME}.so"
    library.parent.mkdir(parents=True)
    compiles: list[str] = []

    def fake_compile(name, sources, build_directory, **_):
        compiles.append(build_directory)
        shutil.copy(built, f"{build_directory}/{name}.so")
        return "freshly built"

    monkeypatch.setattr(cpp_extension, "load", fake_compile)
    return SimpleNamespace(built=built, library=library, compiles=compiles)


def test_a_built_library_is_imported_without_compiling(private_cache):
    shutil.copy(private_cache.built, private_cache.library)  # as another checkout built it
    module = kernels._build()
    assert private_cache.compiles == []
    assert module is not None and module.__spec__.origin == str(private_cache.library)
    x = torch.randn(2, 64)
    w = torch.randn(8, 64)
    torch.testing.assert_close(module.skinny_linear(x, w, None), F.linear(x, w))


def test_an_interrupted_build_leaves_nothing_that_blocks_the_next(private_cache):
    cache_dir = private_cache.library.parent
    (cache_dir / "build-killed").mkdir()  # what a killed build leaves: its work folder,
    (cache_dir / "build-killed" / "lock").touch()  # torch's file lock in it, and
    (cache_dir / "build.lock").touch()  # our lock file (its flock died with the process)
    (cache_dir / "lock").touch()  # torch's lock where builds once ran: waited on forever
    assert kernels._build() == "freshly built" and len(private_cache.compiles) == 1
    assert private_cache.library.stat().st_size > 0
    assert not list(cache_dir.glob("build-*"))  # the leftover and the work folder are gone
    assert kernels._build().__spec__.origin == str(private_cache.library)
    assert len(private_cache.compiles) == 1


def test_a_cached_library_that_does_not_load_is_built_again(private_cache):
    private_cache.library.write_bytes(b"not a shared library")  # e.g. a broken toolchain's
    assert kernels._build() == "freshly built"
    assert private_cache.library.read_bytes()[:4] == b"\x7fELF"
