"""Packed sequences: several documents in one row of a batch, each processed exactly as if it were alone.

The convention is that of `transformers.DataCollatorWithFlattening`: one row holds the examples one after the
other, `position_ids` restart at 0 at each example's first token, and the labels hold -100 there (so the last
token of one document is never trained to predict the first token of the next). The collator can also describe the
documents with `seq_idx` (the example each token belongs to) or with the FlashAttention kwargs `cu_seq_lens_q` /
`cu_seq_lens_k` (cumulative lengths over the flattened batch) and `max_length_q` / `max_length_k`.

For a TTT layer a document start means a fresh sequence: the inner model restarts from its learned initial weights
with no pending gradient sum (`G = 0`), its mini-batches are aligned to the document's first token (Sec. 2.5 of the
paper, Sun et al. 2024, arXiv 2407.04620), RoPE uses the position inside those mini-batches, and the causal convs
read zeros before the document's first token, as they do before a sequence's first token.

Only those three things depend on the documents; everything token-wise (embeddings, projections, norms, MLPs, the
head) runs on the packed `[B, T]` layout unchanged. `DocumentLayout`, built once per forward by `document_layout`,
tells the layers where the documents lie: the index of every token inside its document (for the convs and RoPE),
and how to move the inner loop's inputs into batches of documents `[n, H, L, ·]` (documents of similar length,
right-padded to the longest: the `num_tokens` convention every backend supports) and its outputs back. A batch with no document start after a row's
first token gets no layout, so it takes the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import InnerState

#: Keyword arguments of `DataCollatorWithFlattening` (besides `position_ids`) that describe the documents.
PACKING_KWARGS = ("seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class DocumentGroup:
    """Documents of similar length that the inner loop runs as one batch `[n, H, L, ·]`, right-padded to the longest
    (`L` tokens); `documents` are their indices among the layout's `N`."""

    documents: torch.Tensor
    lengths: torch.Tensor
    max_length: int
    unpack_index: torch.Tensor  # [n·L] flat index b·T + t of each slot's packed token (any token past an end)
    unpack_valid: torch.Tensor  # [n, L] the slot holds a token of its document

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, H, T, *]` -> `[n, H, L, *]`, each document from slot 0, zeros past its end."""
        rest = x.shape[3:]
        tokens = x.movedim(2, 1).flatten(0, 1)  # [B·T, H, *]
        n = self.documents.shape[0]
        docs = tokens.index_select(0, self.unpack_index).unflatten(0, (n, self.max_length))
        valid = self.unpack_valid.view(n, self.max_length, *([1] * (1 + len(rest))))
        return docs.masked_fill(~valid, 0.0).movedim(1, 2)  # [n, H, L, *]


@dataclass
class DocumentLayout:
    """Where the documents of a packed batch `[B, T]` lie (`N` documents).

    The batch is the one the layers see: right-padded when the input had padding (`num_tokens` real tokens per row),
    each row's documents one after the other. Every row holds at least one document (a row of padding only holds
    one of length 0, whose state is the initial one).

    The inner loop runs the documents as batches of sequences, right-padded (the `num_tokens` convention every
    backend supports). One batch padded to the longest document would cost `N × longest` tokens of work and memory
    (a row of many short files beside one long one: many times the real tokens), so the documents are grouped by
    length, longest first, a new group starting where a document is at most half the group's longest: the padding
    is below 2x the real tokens, and far less on typical data.

    index_in_doc: `[B, T]` index of each token inside its document (0 at each document start and at padding).
    doc_lengths: `[N]` tokens of each document.
    groups: the `DocumentGroup`s, longest documents first; together they hold every document once.
    pack_index: `[B·T]` flat index of each packed token among the groups' slots (the groups' `[n·L]` one after the
        other).
    pack_valid: `[B, T]` real (non-padding) token, or None when no row is padded.
    last_document: `[B]` index of each row's last document among the groups' documents in group order: the one a
        cache returned by the forward continues.
    last_length: `[B]` its length.
    """

    index_in_doc: torch.Tensor
    doc_lengths: torch.Tensor
    groups: list[DocumentGroup]
    pack_index: torch.Tensor
    pack_valid: torch.Tensor | None
    last_document: torch.Tensor
    last_length: torch.Tensor

    @classmethod
    def from_starts(cls, starts: torch.Tensor, num_tokens: torch.Tensor | None) -> "DocumentLayout":
        """From `starts` `[B, T]` (True at each document's first token) on rows whose first `num_tokens` tokens are
        real (all when None). A row's first column always starts a document."""
        batch, seq_len = starts.shape
        device = starts.device
        columns = torch.arange(seq_len, device=device)
        real = None if num_tokens is None else columns.unsqueeze(0) < num_tokens.unsqueeze(1)
        starts = starts.clone()
        if real is not None:
            starts &= real
        starts[:, 0] = True
        flat_starts = starts.flatten()
        doc_of_token = torch.cumsum(flat_starts, 0) - 1  # [B·T], row-major: a row's documents follow the last row's
        doc_start = flat_starts.nonzero().squeeze(1)  # [N] flat index of each document's first token
        index_in_doc = torch.arange(batch * seq_len, device=device) - doc_start[doc_of_token]
        docs_per_row = starts.sum(dim=1)
        last_document = torch.cumsum(docs_per_row, 0) - 1
        # A document ends where the next one starts, a row's last one at the row's last real token.
        row_ends = torch.arange(batch, device=device) * seq_len + (seq_len if num_tokens is None else num_tokens)
        doc_end = torch.cat([doc_start[1:], doc_start.new_zeros(1)]).index_copy(0, last_document, row_ends)
        doc_lengths = doc_end - doc_start
        if real is not None:
            index_in_doc = index_in_doc.masked_fill(~real.flatten(), 0)

        # Groups by length (see the class docstring), decided on the host from the N lengths.
        order = torch.sort(doc_lengths, descending=True, stable=True).indices
        sorted_lengths = doc_lengths[order].tolist()
        groups, slot_of_doc_start, rank, offset = [], torch.empty_like(doc_lengths), torch.empty_like(order), 0
        first = 0
        while first < len(sorted_lengths):
            longest = max(sorted_lengths[first], 1)
            last = first + 1
            while last < len(sorted_lengths) and 2 * sorted_lengths[last] > longest:
                last += 1
            documents = order[first:last]
            lengths = doc_lengths[documents]
            slots = torch.arange(longest, device=device)
            unpack_index = (doc_start[documents].unsqueeze(1) + slots).clamp(max=batch * seq_len - 1).flatten()
            groups.append(DocumentGroup(documents, lengths, longest, unpack_index,
                                        slots.unsqueeze(0) < lengths.unsqueeze(1)))
            slot_of_doc_start[documents] = offset + longest * torch.arange(last - first, device=device)
            rank[documents] = torch.arange(first, last, device=device)
            offset += longest * (last - first)
            first = last
        pack_index = slot_of_doc_start[doc_of_token] + index_in_doc
        return cls(index_in_doc.view(batch, seq_len), doc_lengths, groups, pack_index, real, rank[last_document],
                   doc_lengths[last_document])

    @property
    def num_documents(self) -> int:
        return self.doc_lengths.shape[0]

    def pack(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The groups' `[n, H, L, *]` outputs -> `[B, H, T, *]`, the inverse of the groups' `unpack`; zeros at
        padding."""
        batch, seq_len = self.index_in_doc.shape
        slots = torch.cat([y.movedim(2, 1).flatten(0, 1) for y in outputs])  # [Σ n·L, H, *]
        x = slots.index_select(0, self.pack_index).unflatten(0, (batch, seq_len))  # [B, T, H, *]
        if self.pack_valid is not None:
            x = x.masked_fill(~self.pack_valid.view(batch, seq_len, *([1] * (x.dim() - 2))), 0.0)
        return x.movedim(1, 2)

    def last_document_state(self, states: list[InnerState]) -> InnerState:
        """The final state of each row's last document `[B, ...]` from those of the groups (`[n, ...]` each, in
        group order): what a cache keeps, so that continuing the row continues its last document (with `seen` its
        length)."""
        def pick(tensors) -> torch.Tensor:
            return torch.cat(list(tensors)).index_select(0, self.last_document)

        weights = tuple(pick(s.weights[i] for s in states) for i in range(len(states[0].weights)))
        grads = tuple(pick(s.grads[i] for s in states) for i in range(len(states[0].grads)))
        return InnerState(weights, grads, pick(s.seen for s in states))

    def lookback_within_document(self, lookback: int) -> torch.Tensor:
        """`[B, T]` True where the token `lookback` positions back lies in the same document (a causal conv's tap
        with that lookback may read it)."""
        return self.index_in_doc >= lookback

    def conv_state_valid(self, width: int) -> torch.Tensor:
        """`[B, width]` True where a conv state slot (the last `width` inputs of the row, oldest first) belongs to
        the row's last document; the other slots must read as zeros, as in a fresh sequence's state."""
        lookback = width - torch.arange(width, device=self.last_length.device)  # slot i is `width - i` back
        return lookback.unsqueeze(0) <= self.last_length.unsqueeze(1)


def batch_rows(values: torch.Tensor, name: str, batch: int, seq_len: int) -> torch.Tensor:
    """`values` of shape `[T]`, `[1, T]` or `[B, T]` as `[B, T]` (a single row is broadcast over the batch)."""
    if values.dim() == 1:
        values = values.unsqueeze(0)
    if values.dim() != 2 or values.shape[-1] != seq_len or values.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape (batch, seq_len) = {(batch, seq_len)}, got {tuple(values.shape)}.")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {values.dtype}.")
    return values.expand(batch, seq_len)


def document_layout(
    position_ids: torch.Tensor | None,
    packing_kwargs: dict,
    order: torch.Tensor | None,
    num_tokens: torch.Tensor | None,
    batch: int,
    seq_len: int,
    device: torch.device,
) -> DocumentLayout | None:
    """The documents of a forward's input, or None when every row is one sequence (the plain path).

    `position_ids` restarting at 0 after a row's first real token, `seq_idx`, or `cu_seq_lens_q` / `cu_seq_lens_k`
    (`packing_kwargs`, see `PACKING_KWARGS`) mark the documents; where several are given they must agree. With
    padding (`order`, `num_tokens` from the attention mask: each row's real tokens moved to its front) the documents
    are those of the real tokens. Raises a `ValueError` for ids that are not packed documents.
    """
    unknown = set(packing_kwargs) - set(PACKING_KWARGS)
    if unknown:
        raise ValueError(f"Unknown packing arguments {sorted(unknown)}; expected some of {PACKING_KWARGS}.")
    columns = torch.arange(seq_len, device=device)
    real = None if num_tokens is None else columns.unsqueeze(0) < num_tokens.unsqueeze(1)

    def compact(values: torch.Tensor) -> torch.Tensor:
        """`[B, T]` values of the input's columns in the layers' order (real tokens first)."""
        values = values.to(device)
        return values if order is None else torch.gather(values, 1, order)

    def column_of(row: int, position: int) -> int:
        """The input column of the layers' `(row, position)`."""
        return position if order is None else int(order[row, position])

    sources = {}  # source name -> [B, T] document starts, on the layers' layout
    if position_ids is not None and seq_len > 1:
        positions = compact(batch_rows(position_ids, "position_ids", batch, seq_len))
        restarts = positions[:, 1:] == 0
        if real is not None:
            restarts &= real[:, 1:]
        if bool(restarts.any()):
            _check_packed_position_ids(positions, real, column_of)
        # ids that never restart still say "one document per row", which the other sources must agree with
        sources["position_ids"] = torch.cat([torch.ones_like(restarts[:, :1]), restarts], dim=1)
    seq_idx = packing_kwargs.get("seq_idx")
    if seq_idx is not None:
        sources["seq_idx"] = _starts_from_ids(compact(batch_rows(seq_idx, "seq_idx", batch, seq_len)))
    for side in ("q", "k"):
        cu_seq_lens = packing_kwargs.get(f"cu_seq_lens_{side}")
        max_length = packing_kwargs.get(f"max_length_{side}")
        if cu_seq_lens is None:
            if max_length is not None:
                raise ValueError(f"max_length_{side} was given without cu_seq_lens_{side}: the documents are "
                                 f"described by cu_seq_lens_{side} (and position_ids or seq_idx), pass it too.")
            continue
        document_ids = _document_ids_from_cu_seq_lens(cu_seq_lens, f"cu_seq_lens_{side}", max_length, batch, seq_len)
        sources[f"cu_seq_lens_{side}"] = _starts_from_ids(compact(document_ids.to(device)))
    if not sources:
        return None

    def counted(starts: torch.Tensor) -> torch.Tensor:
        return starts if real is None else starts & real

    (first_name, first), *others = sources.items()
    for name, starts in others:
        disagree = counted(first) != counted(starts)
        if bool(disagree.any()):
            row, position = (int(v) for v in disagree.nonzero()[0])
            says = {True: "starts a document", False: "continues a document"}
            raise ValueError(
                f"{first_name} and {name} describe different documents: at row {row}, position "
                f"{column_of(row, position)} the token {says[bool(first[row, position])]} by {first_name} but "
                f"{says[bool(starts[row, position])]} by {name}. Pass consistent values (as DataCollatorWithFlattening "
                "builds them) or only one of them."
            )
    starts = counted(first)
    if not bool(starts[:, 1:].any()):
        return None  # every row is one document: the plain path
    return DocumentLayout.from_starts(starts, num_tokens)


def _check_packed_position_ids(positions: torch.Tensor, real: torch.Tensor | None, column_of) -> None:
    """Packed position ids: each row's first id is 0, every later one the previous plus one or 0 (a new
    document). `positions` is on the layers' layout (real tokens first)."""
    previous = torch.cat([torch.full_like(positions[:, :1], -1), positions[:, :-1]], dim=1)
    bad = (positions != previous + 1) & (positions != 0)
    if real is not None:
        bad &= real
    if bool(bad.any()):
        row, position = (int(v) for v in bad.nonzero()[0])
        found = int(positions[row, position])
        after = "as the row's first id" if position == 0 else f"after {int(previous[row, position])}"
        raise ValueError(
            f"The position_ids restart at 0 inside a row, which marks packed documents (the convention of "
            f"DataCollatorWithFlattening), but row {row}, position {column_of(row, position)} has position id {found} "
            f"{after}: in a packed row the first id must be 0 and every later id the previous plus one (same "
            "document) or 0 (a new document). Pass position ids that number each document from 0, or none."
        )


def _starts_from_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T]` True where the document id changes (and at each row's first token)."""
    changes = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.cat([torch.ones_like(changes[:, :1]), changes], dim=1)


def _document_ids_from_cu_seq_lens(cu_seq_lens, name: str, max_length, batch: int, seq_len: int) -> torch.Tensor:
    """`[B, T]` document index of every column from FlashAttention's cumulative lengths over the flattened batch
    (`[0, len_0, len_0 + len_1, ..., B·T]`); a document cannot span two rows."""
    cu_seq_lens = torch.as_tensor(cu_seq_lens)
    total = batch * seq_len
    if cu_seq_lens.dim() != 1 or cu_seq_lens.numel() < 2 or cu_seq_lens.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 1-D integer tensor [0, len_0, len_0 + len_1, ..., {total}] (cumulative "
                         f"document lengths over the flattened batch), got shape {tuple(cu_seq_lens.shape)} and dtype "
                         f"{cu_seq_lens.dtype}.")
    cu_seq_lens = cu_seq_lens.long().cpu()
    lengths = cu_seq_lens[1:] - cu_seq_lens[:-1]
    if int(cu_seq_lens[0]) != 0 or int(cu_seq_lens[-1]) != total or bool((lengths <= 0).any()):
        raise ValueError(f"{name} must start at 0, increase strictly and end at batch * seq_len = {total} (the tokens "
                         f"of the input, padding included), got {cu_seq_lens.tolist()}.")
    row_ends = torch.arange(seq_len, total, seq_len)
    if not bool(torch.isin(row_ends, cu_seq_lens).all()):
        raise ValueError(f"{name} = {cu_seq_lens.tolist()} has a document spanning two rows of the batch (every row "
                         f"end, a multiple of seq_len = {seq_len}, must be a document boundary).")
    if max_length is not None and int(max_length) != int(lengths.max()):
        side = name[-1]
        raise ValueError(f"max_length_{side} = {int(max_length)} disagrees with {name}, whose longest document has "
                         f"{int(lengths.max())} tokens.")
    document_ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return document_ids.view(batch, seq_len)


__all__ = ["DocumentLayout", "PACKING_KWARGS", "batch_rows", "document_layout"]
