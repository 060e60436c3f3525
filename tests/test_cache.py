"""TTTCache: exact continuation at any split (logits and final state), padding that never touches a row's state,
the transformers Cache API on the stored tensors, constant size, and clear errors for inputs that do not fit."""

import pytest
import torch

from conftest import tiny_config, tiny_model
from modeling_ttt.compat import cache_of
from modeling_ttt import TTTCache

TOL = 1e-5
SEQ_LEN = 41
MINI_BATCH = 8  # tiny_config's mini_batch_size


def random_ids(batch, length, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def state_tensors(cache: TTTCache, row=None) -> dict[str, torch.Tensor]:
    """Every stored tensor by name (optionally one row of the batch)."""
    out = {}
    for i, layer in enumerate(cache.layers):
        state = layer.inner_state
        named = {f"W{j}": w for j, w in enumerate(state.weights)}
        named.update({f"G{j}": g for j, g in enumerate(state.grads)})
        named["seen"] = state.seen
        named.update({f"conv:{k}": v for k, v in layer.conv_states.items()})
        for name, t in named.items():
            out[f"layer{i}.{name}"] = t if row is None else t[row : row + 1]
    return out


def assert_states_close(a: dict, b: dict, atol=TOL):
    """Same names, shapes and counters; floats within `atol` relative to max(1, |value|) (the inner biases grow to
    ~10 in these tiny random models, where fp32 rounding of a sum is already ~1e-6)."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        if a[name].is_floating_point():
            assert bool(((a[name] - b[name]).abs() <= atol * b[name].abs().clamp(min=1.0)).all()), name
        else:
            assert torch.equal(a[name], b[name]), name


def run_in_pieces(model, ids, sizes, attention_mask=None):
    cache, logits, start = TTTCache(model.config), [], 0
    with torch.no_grad():
        for size in sizes:
            stop = min(start + size, ids.shape[1])
            mask = None if attention_mask is None else attention_mask[:, start:stop]
            out = model(ids[:, start:stop], attention_mask=mask, cache=cache, use_cache=True)
            assert cache_of(out) is cache
            logits.append(out.logits)
            start = stop
    assert start == ids.shape[1]
    return torch.cat(logits, dim=1), cache


def full_run(model, ids, attention_mask=None):
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, use_cache=True)
    return out.logits, cache_of(out)


def random_partition(length, max_chunk, gen):
    sizes, total = [], 0
    while total < length:
        size = int(torch.randint(1, max_chunk + 1, (1,), generator=gen))
        sizes.append(min(size, length - total))
        total += sizes[-1]
    return sizes


# -- exactness at any split ------------------------------------------------------------------------------------


HAND_PICKED = [
    [SEQ_LEN],
    [1] * SEQ_LEN,
    [MINI_BATCH - 1, 1, 1, MINI_BATCH, SEQ_LEN],
    [MINI_BATCH, MINI_BATCH, 3 * MINI_BATCH, 1],
    [MINI_BATCH + 1, 2 * MINI_BATCH - 1, SEQ_LEN],
    [SEQ_LEN - 1, 1],
]


def test_any_split_gives_full_forward_logits_and_state(variant):
    model = tiny_model(*variant)
    ids = random_ids(2, SEQ_LEN, seed=1)
    full_logits, full_cache = full_run(model, ids)
    gen = torch.Generator().manual_seed(sum(map(ord, "".join(variant))))
    partitions = HAND_PICKED + [random_partition(SEQ_LEN, max_chunk, gen) for max_chunk in (3, 5, 11, 19, 30)]
    for sizes in partitions:
        logits, cache = run_in_pieces(model, ids, sizes)
        assert (logits - full_logits).abs().max().item() <= TOL, sizes
        assert_states_close(state_tensors(cache), state_tensors(full_cache))
        assert cache.get_seq_length() == SEQ_LEN
        assert cache.seen_tokens().tolist() == [SEQ_LEN, SEQ_LEN]


@pytest.mark.parametrize("prefill", [1, 5, MINI_BATCH - 1, MINI_BATCH, MINI_BATCH + 1, 2 * MINI_BATCH + 3])
def test_prefill_then_one_token_at_a_time(prefill):
    total = 3 * MINI_BATCH + 2
    for variant in (("linear", "mamba"), ("mlp", "transformer")):
        model = tiny_model(*variant)
        ids = random_ids(2, total, seed=prefill)
        full_logits, full_cache = full_run(model, ids)
        logits, cache = run_in_pieces(model, ids, [prefill] + [1] * (total - prefill))
        assert (logits - full_logits).abs().max().item() <= TOL
        assert_states_close(state_tensors(cache), state_tensors(full_cache))


def test_split_sweep_with_rows_at_different_positions(variant):
    """Rows that start at different offsets inside their mini-batch (left padding at the first chunk) continue
    exactly at any later split."""
    model = tiny_model(*variant)
    ids = random_ids(3, 30, seed=2)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :10] = 0
    full_logits, full_cache = full_run(model, ids, mask)
    gen = torch.Generator().manual_seed(7)
    for max_chunk in (2, 6, 13):
        sizes = random_partition(30, max_chunk, gen)
        logits, cache = run_in_pieces(model, ids, sizes, attention_mask=mask)
        real = mask.bool()
        assert (logits - full_logits)[real].abs().max().item() <= TOL, sizes
        assert_states_close(state_tensors(cache), state_tensors(full_cache))
        assert cache.seen_tokens().tolist() == [27, 20, 30]


# -- padding ---------------------------------------------------------------------------------------------------


def padded_batch(seed=3):
    """Four rows of width 20: left padding, right padding, padding scattered anywhere, no padding."""
    ids = random_ids(4, 20, seed=seed)
    mask = torch.ones(4, 20, dtype=torch.long)
    mask[0, :5] = 0  # left
    mask[1, 12:] = 0  # right
    mask[2, [0, 1, 9, 10, 19]] = 0  # anywhere
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def test_padding_never_changes_a_rows_state(variant):
    model = tiny_model(*variant)
    ids, mask = padded_batch()
    more = random_ids(4, 11, seed=4)
    cache = TTTCache(model.config)
    with torch.no_grad():
        first = model(ids, attention_mask=mask, cache=cache).logits
        batched_state = {k: v.clone() for k, v in state_tensors(cache).items()}
        second = model(more, cache=cache).logits  # continues each row from its own position
    assert cache.seen_tokens().tolist() == [15 + 11, 12 + 11, 15 + 11, 20 + 11]
    assert cache.get_seq_length() == 20 + 11  # positions, padding included (what generate() slices by)
    for row in range(4):
        real = mask[row].bool()
        alone_ids = ids[row : row + 1, real]
        alone_cache = TTTCache(model.config)
        with torch.no_grad():
            alone_first = model(alone_ids, cache=alone_cache).logits
            alone_state = {k: v.clone() for k, v in state_tensors(alone_cache).items()}
            alone_second = model(more[row : row + 1], cache=alone_cache).logits
        assert (first[row, real] - alone_first[0]).abs().max().item() <= TOL
        assert torch.all(first[row, ~real] == 0)
        assert_states_close({k: v[row : row + 1] for k, v in batched_state.items()}, alone_state)
        assert (second[row] - alone_second[0]).abs().max().item() <= TOL
        assert_states_close(state_tensors(cache, row), state_tensors(alone_cache))


def test_all_padding_chunk_changes_nothing(variant):
    model = tiny_model(*variant)
    ids = random_ids(2, 13, seed=5)
    cache = TTTCache(model.config)
    with torch.no_grad():
        model(ids, cache=cache)
        before = {k: v.clone() for k, v in state_tensors(cache).items()}
        mask = torch.tensor([[0, 0, 0], [0, 1, 0]])
        model(random_ids(2, 3, seed=6), attention_mask=mask, cache=cache)
    after = state_tensors(cache)
    assert_states_close({k: v[:1] for k, v in after.items()}, {k: v[:1] for k, v in before.items()}, atol=0)
    assert cache.seen_tokens().tolist() == [13, 14]


# -- Cache API on the stored tensors ---------------------------------------------------------------------------


@pytest.fixture
def filled():
    """A linear/mamba cache over 3 distinct rows of 11 tokens (mid mini-batch: pending sums are nonzero)."""
    model = tiny_model("linear", "mamba")
    ids = random_ids(3, 11, seed=8)
    cache = TTTCache(model.config)
    with torch.no_grad():
        model(ids, cache=cache)
    return model, ids, cache


def test_reorder_cache_permutes_rows(filled):
    _, _, cache = filled
    before = {k: v.clone() for k, v in state_tensors(cache).items()}
    assert any(v.abs().sum() > 0 for k, v in before.items() if ".G" in k)
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    for name, tensor in state_tensors(cache).items():
        assert torch.equal(tensor, before[name][beam_idx]), name
    assert cache.batch_size == 3


def test_batch_select_indices_keeps_rows_and_continues_like_those_rows(filled):
    model, ids, cache = filled
    before = {k: v.clone() for k, v in state_tensors(cache).items()}
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert cache.batch_size == 2
    for name, tensor in state_tensors(cache).items():
        assert torch.equal(tensor, before[name][1:3]), name
    more = random_ids(2, 6, seed=9)
    with torch.no_grad():
        selected = model(more, cache=cache).logits
        reference = model(torch.cat([ids[1:], more], dim=1)).logits[:, -6:]
    assert (selected - reference).abs().max().item() <= TOL


def test_batch_repeat_interleave_repeats_rows(filled):
    _, _, cache = filled
    before = {k: v.clone() for k, v in state_tensors(cache).items()}
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6
    for name, tensor in state_tensors(cache).items():
        assert torch.equal(tensor, before[name].repeat_interleave(2, dim=0)), name


def test_reset_empties_and_reuse_equals_fresh(filled):
    model, ids, cache = filled
    cache.reset()
    assert not cache.is_initialized and cache.get_seq_length() == 0 and cache.nbytes() == 0
    assert cache.batch_size is None
    with torch.no_grad():
        reused = model(ids[:1], cache=cache).logits  # another batch size is fine after a reset
        fresh = model(ids[:1]).logits
    assert torch.equal(reused, fresh)


def test_get_seq_length_counts_positions_and_seen_counts_tokens(filled):
    model, _, cache = filled
    assert cache.get_seq_length() == 11 and cache.seen_tokens().tolist() == [11, 11, 11]
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    with torch.no_grad():
        model(random_ids(3, 4, seed=10), attention_mask=mask, cache=cache)
    assert cache.get_seq_length() == 15
    assert cache.seen_tokens().tolist() == [15, 14, 12]
    assert all(layer.inner_state.seen.tolist() == [15, 14, 12] for layer in cache.layers)


def test_to_dtype_converts_floats_and_keeps_counters(filled):
    _, _, cache = filled
    before = {k: v.clone() for k, v in state_tensors(cache).items()}
    assert cache.to(dtype=torch.float64) is cache
    for name, tensor in state_tensors(cache).items():
        if name.endswith("seen"):
            assert tensor.dtype == torch.long and torch.equal(tensor, before[name])
        else:
            assert tensor.dtype == torch.float64 and torch.equal(tensor, before[name].double()), name
    cache.to(torch.device("cpu"), dtype=torch.float32)
    assert_states_close(state_tensors(cache), before, atol=0)
    assert all(t.dtype == before[k].dtype for k, t in state_tensors(cache).items())


def test_nbytes_after_16_and_after_4096_tokens_is_identical():
    model = tiny_model("mlp", "mamba")
    ids = random_ids(1, 4096, seed=11)
    cache = TTTCache(model.config)
    with torch.no_grad():
        model(ids[:, :16], cache=cache)
        size_16 = cache.nbytes()
        shapes_16 = {k: tuple(v.shape) for k, v in state_tensors(cache).items()}
        for start in range(16, 4096, 1360):
            model(ids[:, start : start + 1360], cache=cache)
    assert cache.get_seq_length() == 4096
    assert size_16 > 0 and cache.nbytes() == size_16
    assert {k: tuple(v.shape) for k, v in state_tensors(cache).items()} == shapes_16


def test_cache_does_not_crop():
    cache = TTTCache(tiny_config())
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    assert cache.is_compileable is False


# -- bad input -------------------------------------------------------------------------------------------------


def test_cache_for_another_batch_size_is_refused(filled):
    model, _, cache = filled
    with pytest.raises(ValueError, match="holds state for a batch of 3 rows, but the input has 2 rows"):
        model(random_ids(2, 1), cache=cache)


def test_cache_for_another_config_is_refused():
    model = tiny_model("linear", "mamba")
    for other, differing in ((tiny_config(hidden_size=64), "hidden_size"),
                             (tiny_config("mlp"), "ttt_layer_type"),
                             (tiny_config(mini_batch_size=4), "mini_batch_size")):
        with pytest.raises(ValueError, match=f"another model config \\(differs in: .*{differing}"):
            model(random_ids(1, 3), cache=TTTCache(other))


def test_a_cache_of_another_type_is_refused():
    from transformers import DynamicCache

    model = tiny_model("linear", "transformer")
    with pytest.raises(ValueError, match="cache must be a TTTCache"):
        model(random_ids(1, 3), cache=DynamicCache())


def test_position_ids_must_match_length_and_cache(filled):
    model, _, cache = filled
    with pytest.raises(ValueError, match=r"position_ids must have shape \(batch, seq_len\) = \(3, 2\)"):
        model(random_ids(3, 2), position_ids=torch.arange(3).expand(3, 3), cache=cache)
    with pytest.raises(ValueError, match="position_ids you passed disagree with the tokens this model has seen: row 0, position"):
        model(random_ids(3, 2), position_ids=torch.arange(2).expand(3, 2), cache=cache)
    # positions that continue the cache are accepted (TTT only uses them modulo mini_batch_size)
    model(random_ids(3, 2), position_ids=torch.arange(11, 13).expand(3, 2), cache=cache)


def test_attention_mask_of_wrong_shape_is_refused():
    model = tiny_model("mlp", "transformer")
    ids = random_ids(2, 5)
    for mask in (torch.ones(3, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
                 torch.ones(2, 1, 5, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"attention_mask must be a 2D 0/1 mask of shape \(batch, seq_len\)"):
            model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="only 0 \\(padding\\) and 1"):
        model(ids, attention_mask=torch.full((2, 5), 2))


def test_attention_mask_whose_past_disagrees_with_the_cache_is_refused(filled):
    model, _, cache = filled
    mask = torch.ones(3, 11 + 2, dtype=torch.long)
    mask[1, 3] = 0  # says row 1 has seen 10 tokens; the cache has seen 11
    with pytest.raises(ValueError, match=r"holding \[11, 10, 11\] real tokens per row, but the cache has seen "
                                         r"\[11, 11, 11\]"):
        model(random_ids(3, 2), attention_mask=mask, cache=cache)
    model(random_ids(3, 2), attention_mask=torch.ones(3, 13, dtype=torch.long), cache=cache)
