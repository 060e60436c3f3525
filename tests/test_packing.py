"""Packed sequences (several documents in one row, DataCollatorWithFlattening's convention): every document gives
the logits and the loss gradients it gives alone, for both layer types and backbones, on the PyTorch ops and on the
Triton kernels (under TRITON_INTERPRET=1 on a CPU); the other ways of describing documents (seq_idx, cu_seq_lens),
padding, the cache returned by a packed forward, activation checkpointing, and every refused input."""

import pytest
import torch
from conftest import VARIANTS, tiny_model
from transformers import DataCollatorWithFlattening

from modeling_ttt import TTTCache
from modeling_ttt.compat import cache_of
from modeling_ttt.packing import document_layout

LENGTHS = (13, 29, 22)  # none a multiple of the mini-batch (8 or 16)


def random_docs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (1, n), generator=gen) for n in lengths]


def packed(docs):
    """One packed row: input ids, position ids restarting at 0 per document, labels with -100 at each start."""
    input_ids = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs]).unsqueeze(0)
    labels = input_ids.masked_fill(position_ids == 0, -100)
    return input_ids, position_ids, labels


def token_count(docs):
    return sum(d.shape[1] - 1 for d in docs)  # tokens a next-token loss counts


def separate_run(model, docs):
    """Logits of each document alone, concatenated, and the gradients of the sum of the per-document loss sums."""
    model.zero_grad()
    logits, total = [], 0.0
    for doc in docs:
        output = model(doc, labels=doc, use_cache=False, return_logits=True)
        logits.append(output.logits.detach())
        if doc.shape[1] > 1:
            total = total + output.loss * (doc.shape[1] - 1)
    total.backward()
    return torch.cat(logits, dim=1), grads_of(model)


def packed_run(model, docs, **kwargs):
    """Logits and loss-sum gradients of the packed row (`kwargs` replace or add model inputs)."""
    input_ids, position_ids, labels = packed(docs)
    inputs = dict(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False, return_logits=True)
    inputs.update(kwargs)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    model.zero_grad()
    output = model(**inputs)
    (output.loss * token_count(docs)).backward()
    return output.logits.detach(), grads_of(model)


def grads_of(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(actual, expected, tol=1e-5):
    """|actual − expected| ≤ tol · max(1, max|expected|) for every parameter (as tests/test_triton.py: float32
    sums taken in another order differ by a few ulps of the largest term)."""
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        scale = max(1.0, expected[name].abs().max().item())
        error = (grad - expected[name]).abs().max().item()
        assert error <= tol * scale, f"{name}: max error {error:.3g} > {tol} × {scale:.3g}"


def assert_same_logits(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# -- one packed row against its documents alone ----------------------------------------------------------------


@pytest.mark.parametrize("mini_batch_size", [8, 16])
def test_packed_row_equals_documents_alone(variant, mini_batch_size):
    model = tiny_model(*variant, mini_batch_size=mini_batch_size, ttt_impl="torch")
    docs = random_docs(LENGTHS)
    logits, grads = packed_run(model, docs)
    expected_logits, expected_grads = separate_run(model, docs)
    assert_same_logits(logits, expected_logits)
    assert_same_grads(grads, expected_grads)
    # the packed row is not one long sequence: the reset matters
    with torch.no_grad():
        whole = model(packed(docs)[0]).logits
    assert (whole[:, LENGTHS[0]:] - expected_logits[:, LENGTHS[0]:]).abs().max() > 1e-3


def test_packed_row_is_exact_in_float64():
    """In float64 the packed row and the documents alone agree to rounding: the reset is exact, not approximate."""
    model = tiny_model("mlp", "mamba", ttt_impl="torch").double()
    docs = random_docs(LENGTHS)
    logits, grads = packed_run(model, docs)
    expected_logits, expected_grads = separate_run(model, docs)
    torch.testing.assert_close(logits, expected_logits, atol=1e-12, rtol=0)
    assert_same_grads(grads, expected_grads, tol=1e-11)


@pytest.mark.parametrize("lengths", [(5, 1, 7, 3), (1, 1, 1)], ids=["within-one-mini-batch", "single-tokens"])
def test_documents_shorter_than_a_mini_batch(lengths):
    """All documents inside one mini-batch (the ops' short-chunk path), down to documents of one token each."""
    model = tiny_model("linear", "mamba", ttt_impl="torch")
    docs = random_docs(lengths)
    input_ids, position_ids, _ = packed(docs)
    with torch.no_grad():
        logits = model(input_ids, position_ids=position_ids).logits
        expected = torch.cat([model(d).logits for d in docs], 1)
    assert_same_logits(logits, expected)


def test_two_rows_with_different_boundaries():
    """Row 1 has a document starting exactly on a mini-batch boundary (8), one of length 1, and ends with one
    shorter than the conv width."""
    model = tiny_model("mlp", "mamba", ttt_impl="torch")
    rows = [random_docs(LENGTHS, seed=1), random_docs((8, 1, 40, 13, 2), seed=2)]
    input_ids, position_ids, labels = (torch.cat(parts) for parts in zip(*(packed(docs) for docs in rows)))
    model.zero_grad()
    output = model(input_ids, position_ids=position_ids, labels=labels, use_cache=False)
    (output.loss * sum(token_count(docs) for docs in rows)).backward()
    grads = grads_of(model)
    expected_logits, expected_grads = separate_run(model, rows[0] + rows[1])
    assert_same_logits(output.logits.detach(), expected_logits.view(2, 64, -1))
    assert_same_grads(grads, expected_grads)


def test_documents_are_grouped_by_length_so_padding_stays_below_twice_the_tokens():
    from modeling_ttt.packing import DocumentLayout

    # two rows of 1024; row 0 is padded after column 1001, which cuts its last document to 597 tokens
    lengths = [[300, 3, 60, 40, 1, 597], [700, 2, 2, 30, 10, 200, 80]]
    num_tokens = torch.tensor([1001, 1024])
    starts = torch.zeros(2, 1024, dtype=torch.bool)
    for row, docs in enumerate(lengths):
        starts[row, torch.tensor([0, *docs[:-1]]).cumsum(0)] = True
    layout = DocumentLayout.from_starts(starts, num_tokens)
    got = sorted(int(n) for group in layout.groups for n in group.lengths)
    assert got == sorted(n for docs in lengths for n in docs)
    for group in layout.groups:  # each document more than half its group's longest; the longest group first
        assert group.max_length == int(group.lengths.max()) and bool((2 * group.lengths > group.max_length).all())
    assert [g.max_length for g in layout.groups] == sorted((g.max_length for g in layout.groups), reverse=True)
    slots = sum(g.max_length * g.documents.shape[0] for g in layout.groups)
    assert slots < 2 * int(num_tokens.sum())  # one batch padded to the longest would hold 13 x 700 slots
    # unpack then pack gives the real tokens back, zeros at padding; each row's last document is found
    x = torch.randn(2, 3, 1024, 5)
    back = layout.pack([g.unpack(x) for g in layout.groups])
    real = (torch.arange(1024).unsqueeze(0) < num_tokens.unsqueeze(1)).view(2, 1, 1024, 1)
    assert torch.equal(back, x * real)
    assert layout.last_length.tolist() == [597, 80]


def test_one_dimensional_position_ids_broadcast_over_the_batch():
    model = tiny_model("linear", "transformer", ttt_impl="torch")
    rows = [random_docs(LENGTHS, seed=1), random_docs(LENGTHS, seed=2)]
    input_ids = torch.cat([packed(docs)[0] for docs in rows])
    position_ids = packed(rows[0])[1][0]  # [T]
    with torch.no_grad():
        logits = model(input_ids, position_ids=position_ids).logits
        expected = torch.cat([model(d).logits for docs in rows for d in docs], 1).view(2, 64, -1)
    assert_same_logits(logits, expected)


def test_rows_without_restarts_take_the_plain_path(monkeypatch):
    """Position ids that never restart build no layout, and give bit-identical results to passing none."""
    from modeling_ttt import packing

    monkeypatch.setattr(packing.DocumentLayout, "from_starts",
                        classmethod(lambda cls, *args: pytest.fail("built a layout for unpacked rows")))
    model = tiny_model("linear", "mamba", ttt_impl="torch")
    ids = random_docs([2 * 21])[0].view(2, 21)
    with torch.no_grad():
        plain = model(ids).logits
        assert torch.equal(model(ids, position_ids=torch.arange(21).expand(2, 21)).logits, plain)
        one_document = torch.zeros(2, 21, dtype=torch.int32)
        assert torch.equal(model(ids, position_ids=torch.arange(21), seq_idx=one_document).logits, plain)
    assert document_layout(torch.arange(21), {}, None, None, 2, 21, torch.device("cpu")) is None


# -- the Triton kernels ---------------------------------------------------------------------------------------


def _triton_skip_reason():
    from test_triton import SKIP_REASON

    return SKIP_REASON


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{a}-{b}" for a, b in VARIANTS])
def test_packed_row_on_triton_kernels(variant, monkeypatch):
    reason = _triton_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from test_triton import DEVICE

    from modeling_ttt.ops.triton import interface

    monkeypatch.delenv("TTT_IMPL", raising=False)
    calls = []
    chunk = interface._chunk
    monkeypatch.setattr(interface, "_chunk", lambda *args: calls.append(args[0]) or chunk(*args))
    model = tiny_model(*variant, ttt_impl="triton").to(DEVICE)
    docs = [d.to(DEVICE) for d in random_docs(LENGTHS)]
    logits, grads = packed_run(model, docs)
    assert calls and set(calls) == {variant[0]}  # the kernels did run, on the packed documents
    model.config.ttt_impl = "torch"
    expected_logits, expected_grads = separate_run(model, docs)
    assert_same_logits(logits, expected_logits)
    assert_same_grads(grads, expected_grads, tol=1e-4)  # kernel and reference accumulate in different orders


# -- DataCollatorWithFlattening and its other kwargs ------------------------------------------------------------


COLLATOR_OPTIONS = {
    "position_ids": dict(),
    "seq_idx": dict(return_seq_idx=True),
    "flash_attn_kwargs": dict(return_flash_attn_kwargs=True),
    "all": dict(return_seq_idx=True, return_flash_attn_kwargs=True),
    "seq_idx-only": dict(return_position_ids=False, return_seq_idx=True),
    "cu_seq_lens-only": dict(return_position_ids=False, return_flash_attn_kwargs=True),
}


@pytest.mark.parametrize("options", COLLATOR_OPTIONS.values(), ids=COLLATOR_OPTIONS.keys())
def test_collator_output_fed_straight_to_the_model(options):
    model = tiny_model("linear", "mamba", ttt_impl="torch")
    docs = random_docs(LENGTHS)
    batch = DataCollatorWithFlattening(**options)([{"input_ids": d[0].tolist()} for d in docs])
    assert ("position_ids" in batch) == options.get("return_position_ids", True)
    model.zero_grad()
    output = model(**batch)
    (output.loss * token_count(docs)).backward()
    expected_logits, expected_grads = separate_run(model, docs)
    assert_same_logits(output.logits.detach(), expected_logits)
    assert_same_grads(grads_of(model), expected_grads)


def test_cu_seq_lens_over_a_batch_of_rows():
    """cu_seq_lens count over the flattened batch; every row end is a boundary."""
    model = tiny_model("mlp", "transformer", ttt_impl="torch")
    rows = [random_docs(LENGTHS, seed=1), random_docs((8, 1, 40, 15), seed=2)]
    input_ids = torch.cat([torch.cat(docs, 1) for docs in rows])
    lengths = torch.tensor([d.shape[1] for docs in rows for d in docs])
    cu_seq_lens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    with torch.no_grad():
        logits = model(input_ids, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                       max_length_q=40, max_length_k=40).logits
        expected = torch.cat([model(d).logits for docs in rows for d in docs], 1).view(2, 64, -1)
    assert_same_logits(logits, expected)


# -- padding, cache, checkpointing ------------------------------------------------------------------------------


def test_padding_is_removed_before_the_documents():
    """Left, inner and right padding: the documents are those of the real tokens (padding's ids are ignored)."""
    model = tiny_model("linear", "mamba", ttt_impl="torch")
    docs = random_docs(LENGTHS)
    input_ids, position_ids, _ = packed(docs)

    def padded(segments):
        """Row from `(start, stop)` spans of the packed row and ints (that many padding tokens, position id 0)."""
        ids, positions, mask = [], [], []
        for segment in segments:
            if isinstance(segment, int):
                ids.append(torch.full((segment,), 7))
                positions.append(torch.zeros(segment, dtype=torch.long))
                mask.append(torch.zeros(segment, dtype=torch.long))
            else:
                ids.append(input_ids[0, slice(*segment)])
                positions.append(position_ids[0, slice(*segment)])
                mask.append(torch.ones(segment[1] - segment[0], dtype=torch.long))
        return torch.cat(ids), torch.cat(positions), torch.cat(mask)

    rows = [padded([5, (0, 13), 2, (13, 50), (50, 64)]), padded([(0, 64), 7]), padded([71])]  # row 2: padding
    batch_ids, batch_positions, batch_mask = (torch.stack(parts) for parts in zip(*rows))
    with torch.no_grad():
        logits = model(batch_ids, attention_mask=batch_mask, position_ids=batch_positions).logits
        expected = torch.cat([model(d).logits for d in docs], 1)[0]
        ones = model(input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids).logits
        # the same documents from seq_idx (one id per document; padding's ids are ignored)
        seq_idx = torch.cumsum(batch_positions == 0, dim=1).int()
        by_seq_idx = model(batch_ids, attention_mask=batch_mask, seq_idx=seq_idx).logits
    torch.testing.assert_close(by_seq_idx, logits, atol=0, rtol=0)
    for row in range(2):
        assert_same_logits(logits[row][batch_mask[row].bool()], expected)
    assert torch.isfinite(logits[2]).all()
    assert_same_logits(ones[0], expected)


@pytest.mark.parametrize("last_length", [22, 2])
def test_returned_cache_continues_each_rows_last_document(variant, last_length):
    """use_cache=True: decoding on from the packed forward's cache equals the last document alone, then the same
    tokens (a last document shorter than the conv width checks that the conv state holds none of the previous one)."""
    model = tiny_model(*variant, ttt_impl="torch")
    width = 13 + 29 + last_length
    rows = [random_docs((13, 29, last_length), seed=1),
            random_docs((8, width - 9 - last_length, last_length + 1), seed=2)]
    input_ids, position_ids, _ = (torch.cat(parts) for parts in zip(*(packed(docs) for docs in rows)))
    new = torch.randint(3, 97, (2, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        output = model(input_ids, position_ids=position_ids, use_cache=True)
        cache = cache_of(output)
        assert cache.seen_tokens().tolist() == [rows[0][-1].shape[1], rows[1][-1].shape[1]]
        steps = [model(new[:, i : i + 1], cache=cache).logits for i in range(3)]
        for row, docs in enumerate(rows):
            alone = TTTCache(model.config)
            model(docs[-1], cache=alone)
            expected = [model(new[row : row + 1, i : i + 1], cache=alone).logits for i in range(3)]
            for step, ref in zip(steps, expected):
                assert_same_logits(step[row : row + 1], ref)


def test_activation_checkpointing_and_scan_checkpoint_groups():
    model = tiny_model("mlp", "mamba", ttt_impl="torch", scan_checkpoint_group_size=1)
    docs = random_docs(LENGTHS)
    expected_logits, expected_grads = separate_run(model, docs)
    model.train()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    logits, grads = packed_run(model, docs, use_cache=True)  # checkpointing turns the cache off
    assert_same_logits(logits, expected_logits)
    assert_same_grads(grads, expected_grads)


# -- refused inputs -------------------------------------------------------------------------------------------


def test_a_cache_with_state_cannot_take_packed_documents():
    model = tiny_model("linear", "transformer", ttt_impl="torch")
    input_ids, position_ids, _ = packed(random_docs(LENGTHS))
    cache = TTTCache(model.config)
    model(input_ids[:, :5], cache=cache)
    with pytest.raises(ValueError, match="cannot continue a cache.*Pass no cache"):
        model(input_ids, position_ids=position_ids, cache=cache)
    # an empty cache is filled, as with use_cache=True and none passed
    empty = TTTCache(model.config)
    model(input_ids, position_ids=position_ids, cache=empty)
    assert empty.seen_tokens().tolist() == [LENGTHS[-1]]


@pytest.mark.parametrize("position_ids, where", [
    ([0, 1, 2, 0, 2, 3], "row 0, position 4 has position id 2 after 0"),
    ([3, 4, 0, 1, 2, 3], "row 0, position 0 has position id 3 as the row's first id"),
    ([0, 1, 2, 0, 1, 5], "row 0, position 5 has position id 5 after 1"),
])
def test_bad_packed_position_ids(position_ids, where):
    model = tiny_model("linear", "transformer", ttt_impl="torch")
    with pytest.raises(ValueError, match="restart at 0 inside a row") as error:
        model(torch.randint(3, 97, (1, 6)), position_ids=torch.tensor([position_ids]))
    assert where in str(error.value)


def test_bad_packed_position_ids_name_the_input_column_under_padding():
    model = tiny_model("linear", "transformer", ttt_impl="torch")
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="row 0, position 6 has position id 4 after 0"):
        model(torch.randint(3, 97, (1, 8)), attention_mask=mask, position_ids=torch.tensor([[5, 5, 0, 1, 2, 0, 4, 5]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]])), r"position_ids and seq_idx describe different documents: at "
                                                       r"row 0, position 3 the token continues a document by "
                                                       r"position_ids but starts a document by seq_idx"),
    (dict(cu_seq_lens_q=torch.tensor([0, 2, 6])), "position_ids and cu_seq_lens_q describe different documents"),
    (dict(position_ids=torch.arange(6), seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]])),
     "position_ids and seq_idx describe different documents: at row 0, position 3 the token continues"),
    (dict(cu_seq_lens_q=torch.tensor([0, 4, 5])),
     r"must start at 0, increase strictly and end at batch \* seq_len = 6"),
    (dict(cu_seq_lens_k=torch.tensor([[0, 4, 6]])), "cu_seq_lens_k must be a 1-D integer tensor"),
    (dict(cu_seq_lens_q=torch.tensor([0, 4, 6]), max_length_q=3), "max_length_q = 3 disagrees with cu_seq_lens_q"),
    (dict(max_length_k=4), "max_length_k was given without cu_seq_lens_k"),
    (dict(seq_idx=torch.zeros(1, 5)), r"seq_idx must have shape \(batch, seq_len\) = \(1, 6\)"),
])
def test_collator_kwargs_that_disagree_or_are_malformed(kwargs, message):
    model = tiny_model("linear", "transformer", ttt_impl="torch")
    ids = torch.randint(3, 97, (1, 6))
    with pytest.raises(ValueError, match=message):
        model(**{"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1]]), "labels": ids, **kwargs})


def test_cu_seq_lens_documents_cannot_span_rows():
    model = tiny_model("linear", "transformer", ttt_impl="torch")
    with pytest.raises(ValueError, match="has a document spanning two rows"):
        model(torch.randint(3, 97, (2, 4)), cu_seq_lens_q=torch.tensor([0, 2, 6, 8]))
