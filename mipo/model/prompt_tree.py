"""Prompt-shared packing: prompts and their continuations in one row, as a tree of segments.

A *group* is one prompt x with K continuations y_1..y_K (DPO: K = 2, y+ and y-; InfoNCE-style
losses: more). Training on (x, y+) and (x, y-) as two rows runs every prompt token twice; a group
runs it once. Prompts of a micro-batch often begin alike too (the chat template's system prompt;
GSM8K's 8-shot block, ~900 of its ~1000 tokens), so their longest common prefix c runs once
for the whole micro-batch. The micro-batch becomes a tree of *segments*, laid out in one row
with no padding, every segment after its parent:

    tokens     c_0 .. | tail of x_1 .. | y_11 .. | y_12 .. | tail of x_2 .. | y_21 .. | y_22 ..
    segment    0      | 1              | 2       | 3       | 4              | 5       | 6
    parent     -      | 0              | 1       | 1       | 0              | 4       | 4
    positions  0 ..   | |c| ..         | |x_1|.. | |x_1|.. | |c| ..         | |x_2|.. | |x_2|..

A token's position is its position in its own unshared row (c, tail of x_g, y_gk), so positions
restart after the prompt for every continuation. Query token q may attend to key token k iff

    segment[k] is segment[q] or one of its ancestors,  and  k <= q          (``may_attend``)

so y_12 sees c, the tail of x_1 and its own past, never y_11 or the other group. Every token thus
sees exactly the keys, values and rotary positions it would see in its unshared row (c, x_g, y_gk):
the forward is the unshared one, with each shared segment computed once. In the backward, autograd
sums in a shared segment's activations the gradients that the unshared path sends to each of its
copies, so the loss and every parameter gradient equal the unshared path's (tests/training/test_forward.py).

Encoded rows become groups through ``group_by_prompt``, the one grouping of rows by prompt (the
training forward groups each pair's rows with it, the scorer a whole batch); the shared prefix c is
``common_prefix_length``.

Token y_gk[t] is predicted by the hidden state just before it *in its own row*: the last prompt
token for t = 0 (not adjacent to y_gk in the packed row for k > 1), else y_gk[t-1]. ``pack_groups``
lists these (source position, target token, continuation) triples, so only positions that
predict a response token ever reach the output layer.

How attention follows the rule: ``mipo.model.segment_attention`` (attention of each segment over its
ancestors' keys and its own: only the useful blocks, with sdpa), a flex-attention ``BlockMask``
(``block_mask``, which skips blocks where no query may attend), or a dense 4D mask
(``dense_mask``: the rule written out, O(N^2) memory; the reference the others are tested against).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mipo.data.encoding import EncodedRow


@dataclass(frozen=True)
class PromptGroup:
    """A prompt and the continuations scored under it (token ids)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]


def group_by_prompt(rows: Sequence[EncodedRow]) -> tuple[list[PromptGroup], list[int]]:
    """Rows grouped by prompt: one group per distinct (truncated) prompt, in first-seen order, with the
    responses of its rows in input order.

    The one grouping of rows by prompt: the training forward groups each pair's K rows with it
    (``mipo.training.forward.pair_groups``: DPO's (x, [y+, y-]); SAMI's x and x' as two groups), the
    scorer a whole batch of rows (``mipo.model.logprobs.prompt_tree_logps``).

    Returns:
        ``(groups, order)``: ``order[j]`` is the index in ``rows`` of the j-th continuation of the
        groups in ``pack_groups`` order (group by group, in order within a group).
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        by_prompt.setdefault(row.prompt_ids, []).append(i)
    groups = [PromptGroup(prompt, tuple(rows[i].response_ids for i in index)) for prompt, index in by_prompt.items()]
    return groups, [i for index in by_prompt.values() for i in index]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token id sequences."""
    first = sequences[0]
    length = min(map(len, sequences))
    for other in sequences[1:]:
        same = 0
        while same < length and other[same] == first[same]:
            same += 1
        length = same
    return length


@dataclass(frozen=True)
class Segment:
    """A run of tokens of the packed row: ``[start, end)``, its ``parent`` segment (-1 for a root)
    and its ``ancestors`` (segment indices, root first), whose keys it attends to in full."""

    start: int
    end: int
    parent: int
    ancestors: tuple[int, ...]

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class PackedGroups:
    """Groups laid out as one row of N tokens (see the module docstring)."""

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N): each token's position in its unshared row
    segment_ids: torch.Tensor  # (1, N): the segment of each token
    ancestry: torch.Tensor  # (S, S) bool: ancestry[s, a] iff a is s or an ancestor of s
    segments: tuple[Segment, ...]  # S segments in row order, covering the row
    sources: torch.Tensor  # (M,) position of the hidden state that predicts each response token
    targets: torch.Tensor  # (M,) response token ids
    owners: torch.Tensor  # (M,) continuation of each target: 0 .. C-1, groups in order, then continuations
    num_continuations: int  # C
    _masks: dict = field(default_factory=dict, repr=False, compare=False)  # context_mask's, by shape

    def context_mask(self, s: int, device: torch.device) -> torch.Tensor:
        """(L, A + L) bool: segment ``s``'s L queries over its ancestors' A keys (all allowed) and
        its own (causal): ``ones.tril(A)`` lets row i see keys 0 .. A + i. Built once per shape."""
        length = len(self.segments[s])
        context = sum(len(self.segments[a]) for a in self.segments[s].ancestors)
        key = (length, context, str(device))
        if key not in self._masks:
            self._masks[key] = torch.ones(length, context + length, dtype=torch.bool, device=device).tril(context)
        return self._masks[key]

    def to(self, device: torch.device | str) -> PackedGroups:
        moved = {name: getattr(self, name).to(device) for name in
                 ("input_ids", "position_ids", "segment_ids", "ancestry", "sources", "targets", "owners")}
        return PackedGroups(**moved, segments=self.segments, num_continuations=self.num_continuations)


def pack_groups(groups: Sequence[PromptGroup], pad_token_id: int | None = None) -> PackedGroups:
    """Lay out ``groups`` as one prompt tree in one row (``pad_token_id`` is unused: there is no padding)."""
    for g, group in enumerate(groups):
        if not group.prompt_ids or not group.response_ids or not all(group.response_ids):
            raise ValueError(f"group {g} needs a non-empty prompt and at least one non-empty continuation")
    shared = common_prefix_length([group.prompt_ids for group in groups])
    tokens: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    sources: list[int] = []
    targets: list[int] = []
    owners: list[int] = []

    def add_segment(ids: Sequence[int], first_position: int, parent: int) -> int:
        """Append a segment (if not empty) and return its index, or ``parent`` for an empty one."""
        if not ids:
            return parent
        ancestors = () if parent < 0 else (*segments[parent].ancestors, parent)
        segments.append(Segment(len(tokens), len(tokens) + len(ids), parent, ancestors))
        tokens.extend(ids)
        positions.extend(range(first_position, first_position + len(ids)))
        return len(segments) - 1

    root = add_segment(groups[0].prompt_ids[:shared], 0, -1)
    continuation = 0
    for group in groups:
        prompt_end = add_segment(group.prompt_ids[shared:], shared, root)
        last_prompt_token = segments[prompt_end].end - 1
        for response in group.response_ids:
            start = len(tokens)
            add_segment(response, len(group.prompt_ids), prompt_end)
            sources.extend([last_prompt_token, *range(start, start + len(response) - 1)])
            targets.extend(response)
            owners.extend([continuation] * len(response))
            continuation += 1

    ancestry = torch.eye(len(segments), dtype=torch.bool)
    segment_ids = torch.empty(len(tokens), dtype=torch.long)
    for s, segment in enumerate(segments):
        segment_ids[segment.start:segment.end] = s
        if segment.parent >= 0:
            ancestry[s] |= ancestry[segment.parent]
    return PackedGroups(torch.tensor([tokens]), torch.tensor([positions]), segment_ids[None], ancestry,
                        tuple(segments), torch.tensor(sources), torch.tensor(targets), torch.tensor(owners),
                        num_continuations=continuation)


# --------------------------------------------------------------------------------------------
# The rule, and its masks
# --------------------------------------------------------------------------------------------

def may_attend(ancestry: torch.Tensor, segment_q, q, segment_k, k):
    """Query q may attend to key k: k's segment is q's or an ancestor of it, and k <= q (elementwise)."""
    return ancestry[segment_q, segment_k] & (k <= q)


def dense_mask(packed: PackedGroups) -> torch.Tensor:
    """(1, 1, N, N) bool, True where a query may attend to a key: the 4D mask sdpa takes."""
    segment = packed.segment_ids[0]  # (N,)
    index = torch.arange(segment.shape[0], device=segment.device)
    return may_attend(packed.ancestry, segment[:, None], index[:, None], segment[None, :], index[None, :])[None, None]


def block_mask(packed: PackedGroups):
    """The rule as a flex-attention ``BlockMask``: blocks where no query may attend are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment, ancestry = packed.segment_ids[0], packed.ancestry

    def mask_mod(b, h, q, k):
        return may_attend(ancestry, segment[q], q, segment[k], k)

    length = segment.shape[0]
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=segment.device)
