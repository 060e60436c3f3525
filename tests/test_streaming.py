"""Scoring long streams chunk by chunk (`model.stream` / `score_stream`): equal to one full forward, totals and
buckets consistent, state size flat."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from modeling_ttt import score_stream


def full_forward_nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_stream_equals_one_full_forward(variant, chunk_size):
    model = tiny_model(*variant)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(chunk_size))
    result = model.stream(ids, chunk_size=chunk_size, logits_chunk_size=5, progress=False)
    expected = full_forward_nll(model, ids)
    assert result.token_nll.shape == (2, 44)
    assert (result.token_nll - expected).abs().max().item() <= 1e-5
    assert result.num_tokens == 88
    assert math.isclose(result.total_nll, expected.double().sum().item(), rel_tol=1e-6)
    assert math.isclose(result.perplexity, math.exp(expected.double().mean().item()), rel_tol=1e-6)


def test_one_dimensional_input_and_list_input():
    model = tiny_model("linear", "mamba")
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(1))
    a = score_stream(model, ids, chunk_size=8, progress=False)
    b = score_stream(model, ids.tolist(), chunk_size=30, progress=False)
    assert a.token_nll.shape == (1, 29)
    assert (a.token_nll - full_forward_nll(model, ids[None])).abs().max().item() <= 1e-5
    assert (a.token_nll - b.token_nll).abs().max().item() <= 1e-5


def test_position_buckets_partition_the_scores():
    model = tiny_model("mlp", "mamba")
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(2))
    result = model.stream(ids, chunk_size=9, position_buckets=[0, 8, 16, 40], progress=False)
    nll = result.token_nll  # column t scores the token at position t + 1
    assert result.bucket_edges == [0, 8, 16, 40, 50]
    assert result.bucket_count == [2 * 7, 2 * 8, 2 * 24, 2 * 10]
    for i, (start, end) in enumerate(zip(result.bucket_edges, result.bucket_edges[1:])):
        expected = nll[:, max(start - 1, 0) : end - 1].double().sum().item()
        assert math.isclose(result.bucket_nll[i], expected, rel_tol=1e-6)
    assert math.isclose(sum(result.bucket_nll), result.total_nll, rel_tol=1e-9)
    uniform = model.stream(ids, chunk_size=50, position_buckets=25, progress=False, return_token_nll=False)
    assert uniform.bucket_edges == [0, 25, 50] and uniform.bucket_count == [48, 50]
    assert uniform.token_nll is None
    summary = uniform.to_dict()
    assert summary["num_tokens"] == 98 and len(summary["buckets"]) == 2
    assert math.isclose(summary["perplexity"], math.exp(summary["mean_nll"]))


def test_state_size_is_flat_over_the_stream():
    model = tiny_model("linear", "transformer")
    ids = torch.randint(0, 97, (1, 3000), generator=torch.Generator().manual_seed(3))
    sizes = []
    result = model.stream(ids, chunk_size=500, progress=False, return_token_nll=False,
                          callback=lambda done, cache: sizes.append((done, cache.nbytes(), cache.get_seq_length())))
    assert [done for done, _, _ in sizes] == list(range(500, 3001, 500))
    assert len({size for _, size, _ in sizes}) == 1
    assert [length for _, _, length in sizes] == list(range(500, 3001, 500))
    assert result.num_tokens == 2999 and math.isfinite(result.total_nll)


def test_bad_arguments():
    model = tiny_model("linear", "mamba")
    with pytest.raises(ValueError, match="chunk_size"):
        model.stream(torch.zeros(5, dtype=torch.long), chunk_size=0, progress=False)
    with pytest.raises(ValueError, match=r"input_ids must be \[N\] or \[B, N\]"):
        model.stream(torch.zeros(1, 2, 5, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="position_buckets must be increasing"):
        model.stream(torch.zeros(5, dtype=torch.long), position_buckets=[4, 2], progress=False)
