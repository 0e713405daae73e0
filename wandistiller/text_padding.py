"""Cross-attention over Wan's zero-padded text without computing the padding.

WanPipeline cuts the prompt embeddings at the true token length and zero-pads them to 512 rows. Every padding
row goes through the same text projection, so all of them give one key and one value, and a softmax over n
equal logits is one logit plus log n. Attending over [true tokens, one zero row carrying log(#padding rows)]
is therefore the same attention as over all 512 rows (equal up to float rounding), with ~30x fewer text rows
for a 15-token prompt. At 16 image tokens (a 64x64 toy image) the padding is most of a forward's cost.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .flow import MAX_SEQUENCE_LENGTH

# Attention backends that add a float mask to the logits. The others reject a mask or silently drop it, so
# with them the text is not compacted (see `compact_for`).
ADDITIVE_MASK_BACKENDS = frozenset({AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH,
                                    AttentionBackendName._NATIVE_EFFICIENT})


class PaddedTextAttnProcessor(WanAttnProcessor):
    """Wan's attention processor plus an additive logit bias (B, 1, 1, L) for the compacted text rows.

    A subclass of Wan's processor, so an attention backend set on it (diffusers' `set_attention_backend`)
    applies as it does to Wan's own.
    """

    def __init__(self):
        super().__init__()
        self.bias = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)

    def adds_bias(self) -> bool:
        """Whether this processor's attention backend (its own, else diffusers' active one) adds a float mask."""
        backend = self._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
        return AttentionBackendName(backend) in ADDITIVE_MASK_BACKENDS


def install(blocks) -> PaddedTextAttnProcessor:
    """One shared processor on the cross-attention (`attn2`) of every Wan block; set its `bias` per forward."""
    processor = PaddedTextAttnProcessor()
    for block in blocks:
        block.attn2.set_processor(processor)
    return processor


def text_lengths(states: torch.Tensor) -> torch.Tensor:
    """(B,) the true length of each row of (B, L, D) zero-padded text: one past its last non-zero row.

    A row is padding when it and every row after it are all zero (Wan's padding), so cutting the text at these
    lengths and zero-padding it again (`trim_text`, `pad_text`) gives back the very same tensor.
    """
    positions = torch.arange(1, states.shape[1] + 1, device=states.device)
    return (states.ne(0).any(-1) * positions).amax(1)


def trim_text(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) zero-padded text -> (tokens, lengths): every row's true tokens one after another, (sum of
    lengths, D), and the (B,) lengths. The padding is dropped; `pad_text` puts it back exactly."""
    lengths = text_lengths(states)
    keep = torch.arange(states.shape[1], device=states.device) < lengths[:, None]
    return states[keep], lengths


def pad_text(tokens: torch.Tensor, lengths: torch.Tensor, total_length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """The inverse of `trim_text`: (B, total_length, D) text, row i its `lengths[i]` tokens, then zeros (as
    WanPipeline pads to its max_sequence_length)."""
    lengths = torch.as_tensor(lengths).tolist()
    states = tokens.new_zeros(len(lengths), total_length, tokens.shape[-1])
    for row, rows in zip(states, tokens.split(lengths)):
        row[:len(rows)] = rows
    return states


def compact_text(states: torch.Tensor, total_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L, D) zero-padded text -> (compacted text, logit bias), or (states, None) when nothing is padding.

    A row is padding when it and every row after it are all zero (Wan's padding). `total_length` is the number
    of rows the text stands for (default L; more when `states` was already cut shorter than WanPipeline's 512).
    Meta tensors (counting FLOPs without memory) have no values to find padding in: every row is kept.
    """
    if states.is_meta:
        return states, None
    batch, length, width = states.shape
    total_length = total_length or length
    positions = torch.arange(1, length + 1, device=states.device)
    lengths = text_lengths(states)
    keep = int(lengths.max())
    if keep == total_length:
        return states, None
    compact = torch.cat([states[:, :keep], states.new_zeros(batch, 1, width)], dim=1)
    bias = torch.zeros(batch, keep + 1, device=states.device, dtype=states.dtype)
    bias[:, :keep].masked_fill_(positions[:keep] > lengths[:, None], float("-inf"))
    bias[:, keep] = torch.log((total_length - lengths).to(states.dtype))
    return compact, bias[:, None, None, :]


def compact_for(processors, states: torch.Tensor) -> torch.Tensor:
    """The text to give cross-attention run by `processors`, handing every `PaddedTextAttnProcessor` its bias.

    Compacting is exact only when every processor adds the bias; once a user sets another processor or an
    attention backend without float masks on any of them, the full text goes through unchanged (bias None).
    """
    processors = list({id(p): p for p in processors}.values())
    padded = [p for p in processors if isinstance(p, PaddedTextAttnProcessor)]
    bias = None
    if len(padded) == len(processors) and all(p.adds_bias() for p in padded):
        states, bias = compact_text(states)
    for processor in padded:
        processor.bias = bias
    return states
